# Two commands for a new user (README): `make demo` and `make test`.
# Each sets up .venv from the project's own files first (nothing installed by hand).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlexp-installed
DEMO_URI := sqlite:///$(CURDIR)/mlflow.db

.PHONY: setup demo test bench mlproject

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The main job: a small tracked run on the built-in digits data, logged to ./mlflow.db.
demo: $(STAMP)
	MLFLOW_TRACKING_URI=$(DEMO_URI) $(BIN)/mlexp train --backbone resnet18_scratch --data digits --epochs 3 --img-size 32 --experiment mlexp-demo

# The whole test suite (real MLflow stores and server, real timm models, CPU).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/tracking_overhead.py

mlproject: $(STAMP)
	$(BIN)/python -m mlexp.mlproject > MLproject
