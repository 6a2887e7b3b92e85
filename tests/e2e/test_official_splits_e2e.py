"""A sweep over an official split, as the texture benchmark's downstream experiments run it:
`--folds 1-3 --seeds 1,2` on DTD-layout split files trains 6 runs on exactly the files' lines,
3 distinct splits; `--folds 2` trains partition 2 alone."""

from __future__ import annotations

from mlflow import MlflowClient

from mlexp.commands.cli import main
from tests.data.test_official_splits import CONTEXTS, expected_digest, lines, make_dtd_layout
from tests.helpers import runs_of

TINY = ["--backbones", "test_resnet", "--inits", "scratch", "--img-size", "16", "--batch-size", "64", "--epochs", "1",
        "--scratch-epochs-mult", "1", "--calibrate", "false", "--log-models", "false", "--system-metrics", "false"]


def sweep(args: list[str]) -> None:
    try:
        main(["sweep", *TINY, *args])
    except SystemExit as done:
        assert not done.code


def test_a_sweep_over_official_partitions_trains_each_on_its_files_lines(sqlite_uri, tmp_path):
    dtd = make_dtd_layout(tmp_path / "dtd")
    client = MlflowClient(sqlite_uri)
    sweep(["--data", str(dtd), "--folds", "1-3", "--seeds", "1,2", "--experiment", "dtd"])
    runs = [run for run in runs_of(client, "dtd") if "mlflow.parentRunId" in run.data.tags]
    assert len(runs) == 6 and {run.info.status for run in runs} == {"FINISHED"}
    assert sorted((run.data.params["seed"], run.data.params["fold"]) for run in runs) == \
        [(seed, fold) for seed in ("1", "2") for fold in ("1", "2", "3")]
    assert len({run.data.tags["mlexp.split_digest"] for run in runs}) == 3
    for run in runs:
        fold = int(run.data.params["fold"])
        logged = {d.dataset.name.rsplit("-", 1)[1]: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert logged == {context: expected_digest(lines(dtd, context, fold)) for context in CONTEXTS}

    sweep(["--data", str(dtd), "--folds", "2", "--seeds", "1", "--experiment", "dtd-2"])
    only = [run for run in runs_of(client, "dtd-2") if "mlflow.parentRunId" in run.data.tags]
    assert [run.data.params["fold"] for run in only] == ["2"]
    assert only[0].data.tags["mlexp.split_digest"] == next(run.data.tags["mlexp.split_digest"] for run in runs
                                                           if run.data.params["fold"] == "2")
