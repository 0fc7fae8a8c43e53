# Targets people type. `make test` is the README's test command and what CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest pipeline clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	# MovieLens-100K ships inside this wheel; --no-deps keeps recbole's own torch and friends out.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check training tests

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck pytest

# The full offline pipeline on ML-100K: report in reports/, model in models/.
pipeline: $(STAMP)
	$(PY) -m training pipeline

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
