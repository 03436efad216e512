# Two commands on a fresh clone: `make demo` (set up, fetch the model, run the main job), `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

# Prefect's state (its SQLite database, cached task results) stays in this checkout unless you point
# PREFECT_HOME or PREFECT_API_URL elsewhere; `prefect server start` with the same PREFECT_HOME shows the runs.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/llama2-pipeline demo

test: venv
	$(BIN)/python tests/run_suite.py

test-fast: venv
	$(BIN)/python tests/run_suite.py -m "not slow"

# every script in bench/ but the side-by-side helper they import
bench: venv
	for script in $(filter-out bench/sidebyside.py,$(wildcard bench/*.py)); do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) work mlruns mlflow.db .pytest_cache
