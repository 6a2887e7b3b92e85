"""`mlflow run . -e compare`: `mlexp compare`, its outputs logged to the run MLflow created."""

from entrypoints.project import run_entry_point
from mlexp.commands.runs import compare_with

if __name__ == "__main__":
    run_entry_point("compare", lambda values, run_id: compare_with(values, run_id=run_id))
