# `make example` and `make test` set up .venv on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[dev,examples]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[docs]'
	touch $(DOCS_STAMP)

.PHONY: setup example test test-slow lint docs bench
setup: $(STAMP)

example: $(STAMP)
	$(PY) examples/vgg19_goldfish.py

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
