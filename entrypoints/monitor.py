"""`mlflow run . -e monitor`: `mlexp monitor` (it reads runs; the project's run stays empty)."""

from entrypoints.project import run_entry_point
from mlexp.commands.runs import monitor_with

if __name__ == "__main__":
    run_entry_point("monitor", lambda values, run_id: monitor_with(values))
