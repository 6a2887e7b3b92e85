"""`mlflow run . -e train` (and `-e main`): `mlexp train` in the run MLflow created."""

from entrypoints.project import run_entry_point
from mlexp.commands.cli import train_with
from mlexp.commands.options import build_config

if __name__ == "__main__":
    # The run is the one `mlflow run` created: a --run-id of its own does not apply.
    run_entry_point("train", lambda values, run_id: train_with(
        build_config({k: v for k, v in values.items() if k != "run_id"}), run_id=run_id))
