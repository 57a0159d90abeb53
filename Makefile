# Everyday commands. Each creates the virtual environment (.venv) it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# make demo uses the embedded development database unless MONGODB_CONNECTION_STRING is set.
MONGODB_CONNECTION_STRING ?= embedded

.DEFAULT_GOAL := help
.PHONY: help install install-dev run test demo bench clean

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

# /dashboard reads MongoDB: the one of the environment or .env, else the demo's embedded database.
run: $(VENV)/.runtime ## Start the API on API_HOST:API_PORT (default 0.0.0.0:8000); /dashboard shows the results
	@if [ -z "$$MONGODB_CONNECTION_STRING" ] && ! grep -qs '^MONGODB_CONNECTION_STRING=' .env; then \
	  export MONGODB_CONNECTION_STRING=embedded; fi; \
	exec $(BIN)/python main.py

test: $(VENV)/.dev ## Run the test suite
	$(BIN)/python -m pytest

demo: $(VENV)/.dev ## Import 32 sample conversations, classify them with Ollama, print the report
	MONGODB_CONNECTION_STRING="$(MONGODB_CONNECTION_STRING)" $(BIN)/python scripts/demo.py

bench: $(VENV)/.dev ## Run the benchmarks (fast preset) and write docs/benchmarks.md
	$(BIN)/python scripts/benchmark.py

clean: ## Remove the virtual environment and caches (keeps data and batch files)
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
