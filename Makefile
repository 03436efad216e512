# Two commands on a fresh clone: `make demo` (set up, fetch the model, run the main job), `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench bench-7b clean

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

# The real SmolLM2-135M-Instruct GGUF (a checksummed source, cached in work/cache) for the tests that compare
# with transformers on a real model; they skip when it cannot be fetched.
REAL_MODEL = $$($(BIN)/llama2-pipeline download smollm2_135m_instruct --json 2>/dev/null | tail -1 | \
	$(BIN)/python -c "import json, os, sys; print(os.path.abspath(json.load(sys.stdin)['smollm2_135m_instruct']))" 2>/dev/null)

test: venv
	LLAMA2_PIPELINE_SMOLLM2_GGUF="$(REAL_MODEL)" $(BIN)/python tests/run_suite.py

test-fast: venv
	LLAMA2_PIPELINE_SMOLLM2_GGUF="$(REAL_MODEL)" $(BIN)/python tests/run_suite.py -m "not slow"

# every script in bench/ but the side-by-side helper they import and the 7B run (below)
bench: venv
	for script in $(filter-out bench/sidebyside.py bench/scale_7b.py,$(wildcard bench/*.py)); do $(BIN)/python $$script || exit 1; done

# Llama-2-7B at full size, every stage: ~45 GB of scratch disk, the machine to itself, about half an hour
SCALE_DIR ?= work/scale7b
bench-7b: venv
	$(BIN)/python bench/scale_7b.py $(SCALE_DIR)

clean:
	rm -rf $(VENV) work mlruns mlflow.db .pytest_cache
