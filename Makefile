# The README's two commands: `make demo` and `make test`. Both create or refresh .venv from requirements.txt.
SHELL := /bin/bash
PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.sha256
PROFILE ?= toy
EXP ?= demo
SUBJ ?= 1
MODE ?= enhance
# pytest workers: each runs torch on one thread (tests/conftest.py), so 2 workers use both cores of a 2-core machine.
TEST_WORKERS ?= 2

.PHONY: venv demo test lint world clean-demo

# (Re)create the environment when it is missing or requirements.txt changed since it was built.
venv:
	@if [ ! -x $(PY) ] || ! sha256sum --status -c $(STAMP) 2>/dev/null; then \
		echo "creating $(VENV) from requirements.txt (plain pip; torch comes from local disk)"; \
		$(PYTHON3) -m venv $(VENV) && \
		$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt && \
		sha256sum requirements.txt > $(STAMP); \
	fi

# The toy cortex world (data, key objects, toy foundation models), the ridge baseline, every stage this checkout has,
# then the metrics table and the path of the run's report.html.
demo: venv
	$(PY) download_dataset.py --toy --profile $(PROFILE)
	$(PY) download_dataset.py --toy-weights --profile $(PROFILE)
	$(PY) -m tasks_construction.ridge_baseline --profile $(PROFILE)
	@stages="$$($(PY) -m utils.stages present)"; \
	if [ -n "$$stages" ]; then bash train_neurons.sh cpu $(EXP) $$stages $(MODE) $(SUBJ) $(PROFILE); \
	else echo "no pipeline stage is implemented in this checkout yet; the toy world and its baseline are built"; fi
	$(PY) -m pipeline.report --profile $(PROFILE) --exp $(EXP) --subj $(SUBJ) --mode $(MODE)

lint: venv
	$(PY) -m ruff check .

test: venv
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15
