# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if missing, installs the project with the extras it needs, and runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_TEST := $(VENV)/.stamp-test
STAMP_DEMO := $(VENV)/.stamp-demo

.PHONY: demo test test-slow test-fast test-min check-wheel lint format bench bench-quick clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,demo,docs]'
	touch $@

$(STAMP_DEMO): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

demo: $(STAMP_DEMO)
	$(PY) -m hesskit report $(ARGS)

# tests/run_suite.py runs one pytest process per test file, three at a time, plus the doctests
# and a fast subset with x64 off: one process compiling the whole suite's programs crashed
# inside XLA's compiler late in the run, and the suite is dominated by single-threaded compiles.
# OpenBLAS's own threads (the solvers' small eigh) would fight XLA's and the other jobs': an
# eigh of size 100 took 29-176 ms with them under load and 0.7 ms without.
test: export OPENBLAS_NUM_THREADS = 1
test: $(STAMP_TEST)
	$(PY) -m ruff check hesskit tests benchmarks
	$(PY) -m ruff format --check hesskit tests benchmarks
	$(PY) tests/run_suite.py

# Everything, the tests marked slow too (about 30 minutes on two cores).
test-slow: export OPENBLAS_NUM_THREADS = 1
test-slow: $(STAMP_TEST)
	$(PY) tests/run_suite.py --all

# Build the sdist and wheel, install the wheel alone outside the repository, run eigsh from it.
check-wheel: $(STAMP_TEST)
	$(PY) tests/wheel_check.py

# The lowest versions pyproject.toml allows: each "name>=X" dependency pinned to "name==X" in a
# separate venv, hesskit installed without dependencies, and a fast subset of the suite.
VENV_MIN := .venv-min
MIN_TESTS := tests/test_tree.py tests/test_operators.py tests/test_eigensolvers.py \
	tests/test_saddle_transforms.py tests/test_model_state.py tests/test_frameworks.py \
	tests/test_slq.py tests/test_newton.py tests/test_package.py
MIN_PINS = $$($(PYTHON) -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))\
	["project"]["dependencies"]; print(" ".join(d.replace(">=", "==") for d in deps))')
test-min:
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet $(MIN_PINS) pytest hypothesis scipy scikit-learn equinox
	$(VENV_MIN)/bin/python -m pip install --quiet --no-deps -e .
	$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -E '^(jax|jaxlib|optax|flax|numpy|equinox) '
	# Old jax deprecates calls that newer versions accept (jnp.shape of a ShapeDtypeStruct): here
	# deprecation warnings are shown, not raised as errors as in make test.
	$(VENV_MIN)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
	  -W default::DeprecationWarning $(MIN_TESTS)

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
	$(PY) benchmarks/eigs_outside.py
	$(PY) benchmarks/copies.py
	$(PY) benchmarks/optimizers.py
	$(PY) benchmarks/scale.py

# The documentation site (mkdocs-material + mkdocstrings); warnings are errors.
docs: $(STAMP_TEST)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache .ruff_cache
