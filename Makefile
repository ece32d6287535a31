# Both targets create and reuse .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build lies on local disk on our machines; override for a CUDA machine (TORCH_SPEC="torch>=2.6").
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint format bench-cpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[test,demo,lint]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/forgetting.py $(ARGS)

# Two pytest workers, each taking whole files (module fixtures and spawned ranks stay together):
# on CI's two cores the default run takes about 3.5 min instead of 4.5 min in one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "" $(ARGS)

# ruff (lint, then the format check) and mypy; see [tool.ruff] and [tool.mypy] in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) .ci/typecheck.py

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_step.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
