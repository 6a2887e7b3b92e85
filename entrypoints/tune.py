"""`mlflow run . -e tune`: `mlexp tune`. The run `mlflow run` created becomes the study's parent
when the study is new; when it continues a study, that run is tagged with the study's parent
(`mlexp.study_parent`), found again by the same command whichever way it is started."""

from entrypoints.project import run_entry_point
from mlexp.commands.tune import tune_with

if __name__ == "__main__":
    run_entry_point("tune", lambda values, run_id: tune_with(values, project_run_id=run_id))
