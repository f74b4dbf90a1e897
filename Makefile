# The two set-up commands: `make demo` (the whole pipeline, offline, on the CPU) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# Stage commands in dvc.yaml call `python`: the venv's, also inside DVC's temporary experiment copies.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test lint mlflow-ui

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	python -m demo.run

test: install
	ruff check .
	python -m pytest

lint: install
	ruff check . && ruff format --check .

mlflow-ui: install
	python -m tools.mlflow_ui --port 5000   # prints the runs page with the LoRA and result columns
