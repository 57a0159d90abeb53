# One image, two commands: the API (default) and the batch processor
#   docker run IMAGE                                         -> python main.py (API on :8000)
#   docker run IMAGE python batch_processor.py --mode continuous
# Configuration comes from the environment at run time (--env-file .env); nothing secret is baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    API_HOST=0.0.0.0 \
    API_PORT=8000 \
    BATCH_FILES_DIR=/app/batch_files

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
# The code stays root's (read-only to the app user): a compromised process cannot rewrite it.
COPY . .
# The project itself (editable: its code stays in /app): the scripts import it from anywhere.
RUN pip install --no-deps -e .
# The code's bytecode, compiled once here: with PYTHONDONTWRITEBYTECODE (above) and the code read-only
# to the app user, no process could write it, and every start would compile every module again (a
# batch processor's run paid that on top of its imports: issue 19's fixed cost).
RUN python -m compileall -q -j 0 /app
# Batch files must survive restarts: mount a volume here (docker-compose.yml does). The only
# folder the app writes to.
RUN mkdir -p /app/batch_files && chown app:app /app/batch_files
USER app

EXPOSE 8000
# No HEALTHCHECK here: it would apply to every container of the image, the batch processor's too.
# The API's HTTP check is declared on the api service (docker-compose.yml) or with
#   docker run --health-cmd "python scripts/healthcheck.py" ...
CMD ["python", "main.py"]
