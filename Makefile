# qcflow: two commands on a fresh machine
#   make demo   set up .venv (torch first) and run the main job on the embedded data
#   make test   set up .venv and run the test suite
# Variables: VENV (default .venv), PYTHON (interpreter used to create it),
#            TORCH (pip spec installed first; GPU users: make TORCH=torch setup)

VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.qcflow-installed
# main job: method A's contrastive encoder (<= 10 min on 2 CPU cores incl. building the data)
DEMO_EXPERIMENT ?= encoder_contrastive
# single-threaded BLAS/OpenMP keeps tests stable on small machines (see docs/pitfalls.md)
TEST_ENV = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled

.PHONY: setup demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: with it present, dependencies asking for torch>=2.3 install nothing more
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m qcflow experiment=$(DEMO_EXPERIMENT)

test: setup
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check qcflow tests experiments
	$(VENV)/bin/ruff format --check qcflow tests experiments

format: setup
	$(VENV)/bin/ruff format qcflow tests experiments
	$(VENV)/bin/ruff check --fix qcflow tests experiments

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
