# One entry point. `make demo` and `make test` do all set-up themselves through `make setup`,
# which is idempotent: a second run finds its stamp and takes seconds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned to its CPU wheel (torch 2.13.0); override on GPU machines (TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.npeff-setup-done
# Every other version is pinned in constraints.txt (`make lock` regenerates it).
DEMO_ARGS ?=

.PHONY: setup lock browser lint format test demo bench docs clean help

help:
	@echo "make setup | make lock | make test | make lint | make format | make demo | make bench | make docs"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt tools/setup_env.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "setup failed: could not create $(VENV) with $(PYTHON) \
		(install Python's venv module, e.g. apt-get install python3-venv, or set PYTHON=...)" >&2; exit 1; }
	@$(PY) tools/setup_env.py $(PY) --torch "$(TORCH_SPEC)"
	@touch $(STAMP)

# Re-resolve every dependency to the newest versions the index offers and pin them in constraints.txt.
lock:
	$(PYTHON) tools/setup_env.py --lock $(PYTHON) --torch "$(TORCH_SPEC)"

# Debian's chromium for the report's browser tests (playwright's own browser download is blocked).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
		-y -qq --no-install-recommends chromium; } || echo "could not install chromium: browser tests will be skipped"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: setup browser
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: setup
	$(VENV)/bin/npeff demo $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/projection.py --quick
	$(PY) benchmarks/decompose.py --quick
	$(PY) benchmarks/collect.py --quick

# The documentation site: the tutorial run into docs/tutorial.ipynb, then the site built into site/ (opens from disk).
docs: setup
	$(PY) tools/run_tutorial.py
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs build *.egg-info
