"""The MLflow Project's entry points: `mlflow run . -e NAME` runs `python -m entrypoints.NAME`.

One thin module per entry point. Each parses the parameters MLflow passes with the same
option declarations the `mlexp` CLI uses (an empty parameter means "not set", exactly
like an option left out), adopts the run `mlflow run` created (MLFLOW_RUN_ID) and calls the
library, so `mlflow run . -e train -P lr=0.001` and `mlexp train --lr 0.001` train the
same configuration. `MLproject` is generated from the same declarations
(`python -m entrypoints.mlproject > MLproject`, or `make mlproject`).
"""
