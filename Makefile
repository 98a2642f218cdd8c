# The whole task runner. `make demo` and `make test` work from a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

# Two test processes: most tests wait on Postgres, DBOS or a subprocess, not the CPU.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

lint: install
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/mypy src

bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.sqlite *.sqlite-shm *.sqlite-wal .pytest_cache .mypy_cache .ruff_cache
