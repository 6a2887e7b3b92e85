"""`mlflow run . -e tune`: `mlexp tune`. The study keeps its own parent run (found again by the
same command, whichever way it is started); the run `mlflow run` created ends with it."""

from entrypoints.project import run_entry_point
from mlexp.commands.tune import tune_with

if __name__ == "__main__":
    run_entry_point("tune", lambda values, run_id: tune_with(values))
