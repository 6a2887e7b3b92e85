# Two commands for a new user (README): `make demo` and `make test`.
# Each sets up .venv from the project's own files first (nothing installed by hand).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlexp-installed
DEMO_URI := sqlite:///$(CURDIR)/mlflow.db

.PHONY: setup demo check test bench mlproject

setup: $(STAMP)

# --no-cache-dir: torch's CUDA build is ~3 GB of wheels; caching them as well as installing them
# has run CI machines out of disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e ".[test]"
	touch $(STAMP)

# The main job: pretrain resnet18 on the built-in synthetic images and export the weights
# to a folder of the demo's own (never ./weights/, where a later plain run would pick them
# up), sweep pretrained vs scratch x 2 seeds on the built-in digits, then compare.
# Everything is logged to ./mlflow.db.
DEMO_WEIGHTS := $(CURDIR)/mlexp-output/demo-weights
demo: $(STAMP)
	export MLFLOW_TRACKING_URI=$(DEMO_URI) MLEXP_WEIGHTS_DIR=$(DEMO_WEIGHTS); \
	$(BIN)/mlexp train --backbone resnet18_scratch --data synthetic --epochs 2 --img-size 32 \
	    --scratch-epochs-mult 1 --export-weights --experiment mlexp-demo-pretrain && \
	$(BIN)/mlexp sweep --backbones resnet18 --seeds 1,2 --data digits --epochs 3 --img-size 32 \
	    --experiment mlexp-demo && \
	$(BIN)/mlexp compare --experiment mlexp-demo --out mlexp-output/compare && \
	$(BIN)/python -c "from mlexp.tracking import client_for, ui_hint; \
	    print('\nOpen the runs:', ui_hint('$(DEMO_URI)', client_for('$(DEMO_URI)').get_experiment_by_name('mlexp-demo').experiment_id))"

# The fast tier: the unit tests (not tests/e2e/, nor tests marked slow: real processes, long simulations), under 3 minutes on 2 cores.
check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal --ignore=tests/e2e -m "not slow"

# The whole test suite (real MLflow stores and server, real timm models, real processes, CPU).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal

# Per-batch logging against its peers (W&B's client comes with the bench extra), then whole trainings tracked vs not.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/per_batch_logging.py
	$(BIN)/python benchmarks/tracking_overhead.py

mlproject: $(STAMP)
	$(BIN)/python -m entrypoints.mlproject > MLproject
