"""`mlflow run . -e pretrain`: `mlexp pretrain` (its recipe, scratch init, weights exported)
in the run MLflow created."""

from entrypoints.project import run_entry_point
from mlexp.commands.cli import PRETRAIN_DEFAULTS, train_with
from mlexp.commands.options import build_config

if __name__ == "__main__":
    run_entry_point("pretrain",
                    lambda values, run_id: train_with(build_config(values, PRETRAIN_DEFAULTS), run_id=run_id))
