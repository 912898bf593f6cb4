# Two entry points: `make book` builds the website, `make test` runs every
# test. Both create .venv on first use and reuse it afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Each notebook runs in one xdist worker; --dist loadscope keeps a notebook's
# cells together.
PYTEST_WORKERS ?= 2

.PHONY: book test lint venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-data.txt
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build --all --warningiserror --nitpick --keep-going .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/notebooks.py check

test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope \
		--nbval --nbval-current-env \
		tests chapters

clean:
	rm -rf _build $(VENV)
