# Two entry points: `make book` builds the website, `make test` runs every
# test. Both create .venv on first use and reuse it afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Each notebook runs in one xdist worker; --dist loadscope keeps a notebook's
# cells together.
PYTEST_WORKERS ?= 2

BOOK_BUILD = $(BIN)/jupyter-book build --all --warningiserror --nitpick --keep-going .
SITE_SOURCES := $(wildcard chapters/*.ipynb *.md *.ipynb book_utils/*.py _ext/*.py) \
	$(wildcard benchmarks/results/*.json) \
	_config.yml _toc.yml references.bib

.PHONY: book site test lint venv chromium benchmarks clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-data.txt
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $@

# Always a full build: every chapter is executed again.
book: $(STAMP)
	$(BOOK_BUILD)
	touch _build/html/.built

# The build the browser tests read: rebuilt only when a source changed.
site: _build/html/.built

_build/html/.built: $(STAMP) $(SITE_SOURCES)
	$(BOOK_BUILD)
	touch $@

# The browser tests drive Debian's Chromium, or the browser that the CHROMIUM
# variable names; Playwright cannot download its own browser without network.
chromium:
	@test -n "$$CHROMIUM" || command -v chromium >/dev/null 2>&1 || { \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/notebooks.py check

test: lint chromium site
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope \
		--nbval --nbval-current-env \
		tests chapters performance.ipynb

# Every benchmark (never run by the tests); writes benchmarks/results/<backend>.json.
# REFERENCE_PYTHON names a Python with torch and sentence-transformers (and jax
# and flax) for the encoder's reference; without it the encoder runs alone.
REFERENCE_PYTHON ?=
benchmarks: $(STAMP)
	$(BIN)/python -m benchmarks.run --reference-python "$(REFERENCE_PYTHON)"

clean:
	rm -rf _build $(VENV)
