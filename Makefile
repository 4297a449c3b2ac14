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

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) -m experiments.bench_overhead

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
