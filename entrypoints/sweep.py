"""`mlflow run . -e sweep`: `mlexp sweep`, with the run MLflow created as the sweep's parent."""

from entrypoints.project import run_entry_point
from mlexp.commands.sweep import sweep_with

if __name__ == "__main__":
    run_entry_point("sweep", lambda values, run_id: sweep_with(values, parent_run_id=run_id))
