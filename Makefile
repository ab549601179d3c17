# Everything installs into .venv (ours) and .venv-ref (the reference package, PyPI mblm 0.4.2,
# kept apart because it has the same import name). torch is pinned here to the CPU wheel;
# pyproject.toml keeps a range.
PYTHON ?= python3
VENV := .venv
REF_VENV := .venv-ref
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-ref train test lint format bench clean

install: $(VENV)/.installed
install-ref: $(REF_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(REF_VENV)/.installed:
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q --upgrade pip
	$(REF_VENV)/bin/python -m pip install -q $(TORCH_PIN) mblm==0.4.2
	touch $@

# The main job: configs/quickstart.yaml on a local Ray, tracked in a local MLflow store
train: install
	$(VENV)/bin/mblm train configs/quickstart.yaml

test: install install-ref
	MBLM_REF_PYTHON=$(abspath $(REF_VENV))/bin/python MBLM_REQUIRE_REF=1 \
		$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mblm tests bench jobs
	$(VENV)/bin/ruff format --check mblm tests bench jobs
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format mblm tests bench jobs
	$(VENV)/bin/ruff check --fix mblm tests bench jobs

bench: install install-ref
	MBLM_REF_PYTHON=$(abspath $(REF_VENV))/bin/python $(PY) bench/run.py

clean:
	rm -rf $(VENV) $(REF_VENV) .pytest_cache .ruff_cache .mypy_cache
