# shiftlab: `make run` trains the default experiment, `make test` runs the tests.
# Both create .venv when it is missing and install with the pinned constraints.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# `make run` installs the core dependencies only; the tests add these extras
EXTRAS ?= dev,sweep,deploy
TEST_STAMP := $(VENV)/.installed-test
# Airflow pins SQLAlchemy and friends against ours: it lives in its own virtualenv.
AIRFLOW_VENV  := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

.PHONY: run test test-fast install install-test airflow clean bench mutation mutation-all mutation-tree

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(TEST_STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

$(AIRFLOW_STAMP): deploy/airflow/requirements.txt deploy/airflow/constraints.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -r deploy/airflow/requirements.txt -c deploy/airflow/constraints.txt
	@touch $(AIRFLOW_STAMP)

airflow: $(AIRFLOW_STAMP)

run: install
	$(VENV)/bin/shiftlab-train $(ARGS)

# One OpenMP thread per process: the tests' models are small, and on a shared 2-core machine
# two spinning threads per process make each step far slower.
test: install-test airflow
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: everything not marked slow (make test stays the full suite, as CI runs it).
test-fast: install-test airflow
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m shiftlab.experiments.bench_overhead
	$(PY) -m shiftlab.experiments.batch_regime_bench

# Mutation testing of the critical modules (mutmut; config in pyproject's [tool.mutmut], scores and
# survivors in tests/MUTATION.md). Not part of `make test` / CI: it takes tens of minutes.
# `make mutation` runs the documented subset (tests/mutation_subset.txt), `make mutation-all` every
# mutant of the listed modules. Niced: the machine is shared.
MUTATION_STAMP := $(VENV)/.mutation-installed
$(MUTATION_STAMP): $(TEST_STAMP)
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS),mutation]"
	@touch $(MUTATION_STAMP)

# mutmut names mutants after their file path, and the tests import `shiftlab.*`: it runs in a
# staging tree where the folders sit at src/shiftlab/ (the installed layout), so both agree.
MUTATION_DIR := build/mutation
mutation-tree:
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)/src/shiftlab
	cp -r trainers callbacks kernels experiments configs $(MUTATION_DIR)/src/shiftlab/
	cp -r tests configs pyproject.toml $(MUTATION_DIR)/

mutation: $(MUTATION_STAMP) mutation-tree
	cd $(MUTATION_DIR) && OMP_NUM_THREADS=1 nice -n 15 $(abspath $(PY)) -m mutmut run --max-children 2 \
		$$(grep -v '^#' tests/mutation_subset.txt)
	cd $(MUTATION_DIR) && $(abspath $(PY)) -m mutmut results

mutation-all: $(MUTATION_STAMP) mutation-tree
	cd $(MUTATION_DIR) && OMP_NUM_THREADS=1 nice -n 15 $(abspath $(PY)) -m mutmut run --max-children 2
	cd $(MUTATION_DIR) && $(abspath $(PY)) -m mutmut results

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) outputs multirun .pytest_cache mutants build
