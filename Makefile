# `make example` and `make test` set up .venv on first use, then run. Each installs
# only what it needs: the example its `examples` extra, the tests the `dev` extra too.
VENV ?= .venv
PY := $(VENV)/bin/python
EXAMPLE_STAMP := $(VENV)/.installed-example
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(EXAMPLE_STAMP): pyproject.toml requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[examples]'
	touch $(EXAMPLE_STAMP)

$(STAMP): pyproject.toml requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[dev,examples]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[docs]'
	touch $(DOCS_STAMP)

.PHONY: setup example test test-slow lint docs bench smoke
setup: $(STAMP)

example: $(EXAMPLE_STAMP)
	$(PY) examples/goldfish.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests loraplug

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check loraplug tests examples benchmarks
	$(VENV)/bin/mypy

docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict

# Full measurement against PEFT (several minutes); `make bench ARGS=--quick` for a smoke run.
# (The dev setup includes PEFT; elsewhere install the `bench` extra.)
bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

# The built wheel, installed with its declared dependencies only into a fresh virtual
# environment (not .venv), used as a user would: a few minutes, needs PyPI.
smoke:
	bash .ci/wheel_smoke.sh
