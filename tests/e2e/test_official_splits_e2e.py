"""A sweep over an official split, as the texture benchmark's downstream experiments run it:
`--folds 1-3 --seeds 1,2` on DTD-layout split files trains 6 runs on exactly the files' lines,
3 distinct splits; `--folds 2` trains partition 2 alone."""

from __future__ import annotations

import json

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


def test_a_detector_sweep_over_a_manifest_s_folds_trains_each_on_its_listed_images(sqlite_uri, tmp_path):
    """`--task detection --splits FILE --folds 1,2`: one run per fold, each on the images its fold
    lists (a YOLO folder; the manifest has no class column: a detector's classes are its boxes')."""
    from tests.detection_data import digit_scenes, write_yolo
    from tests.tasks.test_detection_splits import SPLITS, manifest

    root = write_yolo(tmp_path / "boxes", digit_scenes(12, size=48))
    listed = manifest(tmp_path / "splits.csv", [f"images/scene{index:03d}.png" for index in range(12)])
    client = MlflowClient(sqlite_uri)
    sweep(["--task", "detection", "--data", str(root), "--splits", str(listed), "--folds", "1,2", "--seeds", "1",
           "--img-size", "48", "--batch-size", "4", "--experiment", "boxes-folds"])
    runs = {run.data.params["fold"]: run for run in runs_of(client, "boxes-folds")
            if "mlflow.parentRunId" in run.data.tags}
    assert sorted(runs) == ["1", "2"] and {run.info.status for run in runs.values()} == {"FINISHED"}
    assert runs["1"].data.tags["mlexp.split_digest"] != runs["2"].data.tags["mlexp.split_digest"]
    for fold, run in runs.items():
        sizes = {d.dataset.name.rsplit("-", 1)[1]: d for d in run.inputs.dataset_inputs}
        expected = {context: SPLITS[int(fold)].count(context) for context in ("train", "val", "test")}
        assert {context: json.loads(d.dataset.profile)["num_images"] for context, d in sizes.items()} == {
            context: count for context, count in expected.items() if count}, fold
        assert "test/map" in run.data.metrics if expected["test"] else "test/map" not in run.data.metrics
