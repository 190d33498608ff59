# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if missing, installs the project with the extras it needs, and runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_TEST := $(VENV)/.stamp-test
STAMP_DEMO := $(VENV)/.stamp-demo

.PHONY: demo test test-fast lint format bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $@

$(STAMP_DEMO): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

demo: $(STAMP_DEMO)
	$(PY) -m hesskit report $(ARGS)

test: $(STAMP_TEST)
	$(PY) -m ruff check hesskit tests benchmarks
	$(PY) -m ruff format --check hesskit tests benchmarks
	$(PY) -m pytest -q

test-fast: $(STAMP_TEST)
	$(PY) -m pytest -q -m "not slow" -x

lint: $(STAMP_TEST)
	$(PY) -m ruff check hesskit tests benchmarks
	$(PY) -m ruff format --check hesskit tests benchmarks

format: $(STAMP_TEST)
	$(PY) -m ruff format hesskit tests benchmarks
	$(PY) -m ruff check --fix hesskit tests benchmarks

bench: $(STAMP_TEST)
	$(PY) benchmarks/hvp.py
	$(PY) benchmarks/eigs.py
	$(PY) benchmarks/optimizers.py
	$(PY) benchmarks/scale.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
