# shiftlab: `make run` trains the default experiment, `make test` runs the tests.
# Both create .venv when it is missing and install with the pinned constraints.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
EXTRAS ?= dev

.PHONY: run test install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/shiftlab-train $(ARGS)

# One OpenMP thread per process: the tests' models are small, and on a shared 2-core machine
# two spinning threads per process make each step far slower.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m experiments.bench_overhead
	$(PY) -m experiments.batch_regime_bench

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
