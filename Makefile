# The two set-up commands: `make demo` (the whole pipeline, offline, on the CPU) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# Stage commands in dvc.yaml call `python`: the venv's, also inside DVC's temporary experiment copies.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# `make mlflow-server`'s interface and port: MLFLOW_SERVER_HOST=0.0.0.0 serves the team's network
MLFLOW_SERVER_HOST ?= 127.0.0.1
MLFLOW_SERVER_PORT ?= 5000

.PHONY: install demo test test-fast lint mlflow-ui mlflow-server

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	python -m demo.run

test: install  # ruff, then every test, end to end included, a module a worker per core; the 15 slowest at the end
	ruff check .
	python -m pytest -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install  # the tests that need no model, unsloth, subprocess or server: a change to a pure function
	python -m pytest -m "not slow" -q

lint: install
	ruff check . && ruff format --check .

mlflow-ui: install
	python -m tools.mlflow_ui --port 5000   # prints the runs page with the LoRA and result columns

mlflow-server: install  # the team's tracking server: PostgreSQL, artifacts in S3, basic auth; see docs/team.md
	python -m tools.servers mlflow --host $(MLFLOW_SERVER_HOST) --port $(MLFLOW_SERVER_PORT)
