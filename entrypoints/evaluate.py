"""`mlflow run . -e evaluate`: `mlexp evaluate`, logged to the run MLflow created."""

from entrypoints.project import run_entry_point
from mlexp.commands.models import evaluate_with

if __name__ == "__main__":
    run_entry_point("evaluate", lambda values, run_id: evaluate_with(values, run_id=run_id))
