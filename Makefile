# elspeth-nb: `make demo` and `make test` are all a fresh machine needs.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_AUDIT ?= data/demo/audit

.PHONY: help install demo test lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv (if missing) and install the pinned dependencies

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip==26.3
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)  ## run the demo pipeline, print where its audit store is, write the audit report
	$(PY) -m elspeth_nb.cli demo --audit $(DEMO_AUDIT)

test: $(STAMP)  ## run the whole test suite (unit, integration, notebooks) on two workers
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)  ## ruff and mypy
	$(PY) -m ruff check elspeth_nb tests bench
	$(PY) -m mypy elspeth_nb

bench: $(STAMP)  ## the throughput benchmark at 10k and 100k rows
	$(PY) bench/engine_throughput.py --rows 10000 100000

clean:  ## remove the virtual environment and generated files
	rm -rf $(VENV) data/demo/audit data/demo/output data/demo/report.html .pytest_cache bench/_stores
