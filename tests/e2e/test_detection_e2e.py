"""Detection end to end, on real images (digits placed at known boxes on photographs): a
Faster R-CNN over a catalogue backbone trains from `mlexp train --task detection` with one
point of its loss and of each of its four components at every optimizer step (the components
summing to the loss), COCO's mAP on validation every epoch, checkpoints, CSVs and the per-class
AP; malformed annotations stop it before any run exists."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from mlflow import MlflowClient
from PIL import Image
from torch.utils.data import DataLoader

from mlexp.config import TrainConfig
from mlexp.models.build import create_model
from mlexp.models.catalogue import resolve_backbone
from mlexp.tasks.detection.evaluation import evaluate_detector
from mlexp.tasks.kinds import TASKS
from tests.detection_data import CLASSES, digit_scenes, write_coco, write_yolo
from tests.helpers import (
    artifact_paths,
    run_mlexp,
    runs_of,
    steps,
    subprocess_env,
    torchrun_train,
    write_pretrained_weights,
)

COMPONENTS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
SIZE, BATCH, EPOCHS = 96, 8, 3
TRAIN_IMAGES = 38  # of 48, with --val-split 0.2 (the default) holding out 10


@pytest.fixture(scope="module")
def scenes():
    return digit_scenes(48, size=SIZE)


def untrained_map_50(cfg: TrainConfig) -> float:
    """The same detector before any training step, scored on the same validation images."""
    task = TASKS["detection"]
    data = task.build_data(cfg)
    spec = resolve_backbone(cfg.backbone, cfg.init, None)
    torch.manual_seed(cfg.seed)
    model = task.build_model(spec, create_model(spec, data.num_classes, cfg.img_size), cfg, data.num_classes)
    loader = DataLoader(data.val_set, batch_size=BATCH, collate_fn=task.collate)
    return evaluate_detector(model, loader, Accelerator(cpu=True), data.class_names)[0]["map_50"]


@pytest.mark.parametrize("layout, backbone", [("yolo", "resnet18_scratch"), ("coco", "test_resnet")])
def test_a_detector_logs_every_step_s_loss_components_and_learns(layout, backbone, scenes, sqlite_uri, tmp_path):
    root = (write_yolo if layout == "yolo" else write_coco)(tmp_path / layout, scenes)
    args = ["train", "--task", "detection", "--backbone", backbone, "--init", "scratch", "--data", str(root),
            "--img-size", str(SIZE), "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--scratch-epochs-mult", "1",
            "--system-metrics", "false", "--experiment", "detect"]
    done = run_mlexp(args, subprocess_env(sqlite_uri), tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "detect")
    assert run.info.status == "FINISHED" and run.data.params["task"] == "detection"
    assert run.data.params["best_metric"] == "val/map"  # the task's primary metric, unless asked otherwise
    total_steps = EPOCHS * (TRAIN_IMAGES // BATCH)
    history = {key: {point.step: point.value for point in client.get_metric_history(run.info.run_id, key)}
               for key in ("batch/loss", *(f"batch/{name}" for name in COMPONENTS))}
    for key, points in history.items():  # one point per optimizer step, none missing, none twice
        assert sorted(points) == list(range(1, total_steps + 1)), key
    for step, loss in history["batch/loss"].items():
        assert math.isclose(sum(history[f"batch/{name}"][step] for name in COMPONENTS), loss, rel_tol=1e-5,
                            abs_tol=1e-6), step
    for key in (*(f"train/{name}" for name in COMPONENTS), "val/map", "val/map_50", "val/map_75"):
        assert steps(client, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    files = artifact_paths(client, run.info.run_id)
    assert {"evaluation/val/per_class_ap.csv", "checkpoints/best/model.safetensors", "metrics/batch_metrics.csv",
            "summary/training_info.json"} <= files
    batch_csv = client.download_artifacts(run.info.run_id, "metrics/batch_metrics.csv", str(tmp_path))
    with open(batch_csv) as rows:
        header = next(csv.reader(rows))
    assert header[-4:] == [f"batch/{name}" for name in COMPONENTS]
    after = max(point.value for point in client.get_metric_history(run.info.run_id, "val/map_50"))
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **{
        "task": "detection", "data": str(root), "img_size": SIZE, "backbone": backbone, "init": "scratch"}})
    before = untrained_map_50(cfg)
    print(f"{layout} {backbone}: val/map_50 {before:.4f} before training, {after:.4f} after {EPOCHS} epochs")
    assert after > before
    evaluated_as_its_run_validated(client, run.info.run_id, val_images_folder(cfg, scenes, layout, tmp_path / "val"),
                                   tmp_path)


def val_images_folder(cfg: TrainConfig, scenes, layout: str, folder: Path) -> Path:
    """The validation images the run drew (the same split), written as a folder of their own."""
    data = TASKS["detection"].build_data(cfg)
    names = [data.val_set.dataset.images[index].path.stem for index in data.val_set.indices]
    return (write_yolo if layout == "yolo" else write_coco)(folder, [scenes[int(name[5:])] for name in names])


def evaluated_as_its_run_validated(client: MlflowClient, run_id: str, folder: Path, cwd: Path) -> None:
    """`mlexp evaluate` of the run's best detector on its validation images, in a folder of their
    own: the mAPs its run measured on them at its best epoch, logged as an evaluation run."""
    done = run_mlexp(["evaluate", "--model", f"runs:/{run_id}", "--data", str(folder), "--experiment",
                      "detect-evaluate"], subprocess_env(client.tracking_uri), cwd)
    assert done.returncode == 0 and "test mAP" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    run = client.get_run(run_id)
    best_epoch = int(run.data.metrics["best/epoch"])
    [evaluation] = runs_of(client, "detect-evaluate")
    assert evaluation.info.status == "FINISHED" and evaluation.data.params["source_run_id"] == run_id
    for key in ("map", "map_50", "map_75"):
        [measured] = [m.value for m in client.get_metric_history(run_id, f"val/{key}") if m.step == best_epoch]
        assert evaluation.data.metrics[f"test/{key}"] == pytest.approx(measured, abs=1e-4), key
    assert evaluation.data.metrics["test/map_50"] > 0  # a detector that finds digits: the comparison can fail
    with open(client.download_artifacts(evaluation.info.run_id, "evaluation/test/per_class_ap.csv", str(cwd))) as table:
        assert [row["class"] for row in csv.DictReader(table)] == list(CLASSES)


@pytest.mark.parametrize("damage, named", [
    (lambda root: (root / "labels" / "scene002.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n"),
     "scene002.txt line 2: unknown class id 5"),
    (lambda root: (root / "labels" / "scene004.txt").write_text("1 0.98 0.5 0.2 0.2\n"),
     "scene004.txt line 1: a box outside its image"),
    (lambda root: (root / "labels" / "scene003.txt").write_text("1 0.5 0.5 -0.1 0.2\n"),
     "scene003.txt line 1: a box with non-positive size"),
    (lambda root: (root / "images" / "scene001.png").unlink(), "scene001.txt: a label file without its image"),
])
def test_malformed_annotations_stop_the_run_before_it_exists(damage, named, scenes, sqlite_uri, tmp_path):
    root = write_yolo(tmp_path / "yolo", scenes[:6])
    damage(root)
    done = run_mlexp(["train", "--task", "detection", "--backbone", "test_resnet", "--init", "scratch", "--data",
                      str(root), "--experiment", "malformed"], subprocess_env(sqlite_uri), tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and named in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not runs_of(MlflowClient(sqlite_uri), "malformed")  # no run, RUNNING or otherwise


def test_a_sweep_of_pretrained_and_scratch_detectors_sums_up_by_val_map(scenes, sqlite_uri, tmp_path):
    """backbone x init x seeds as for classification: every child a detector run, each said with
    its best val mAP, and the sweep's summary choosing each backbone's best by it."""
    weights = tmp_path / "weights"
    write_pretrained_weights(weights, "test_resnet", "test_resnet")  # no hub here: the test's own file
    root = write_yolo(tmp_path / "yolo", scenes[:24])
    done = run_mlexp(["sweep", "--task", "detection", "--backbones", "test_resnet", "--seeds", "1,2", "--data",
                      str(root), "--img-size", "64", "--epochs", "1", "--batch-size", "8", "--system-metrics", "false",
                      "--experiment", "detect-sweep"],
                     subprocess_env(sqlite_uri, MLEXP_WEIGHTS_DIR=str(weights)), tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    client = MlflowClient(sqlite_uri)
    runs = runs_of(client, "detect-sweep")
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == 4 and {run.info.status for run in children} == {"FINISHED"}
    assert {(run.data.tags["mlexp.init"], run.data.params["seed"]) for run in children} == {
        (init, seed) for init in ("pretrained", "scratch") for seed in ("1", "2")}
    assert all(run.data.params["task"] == "detection" and "best/val_map" in run.data.metrics for run in children)
    said = [line for line in done.stdout.splitlines() if "] FINISHED test_resnet_" in line]
    assert len(said) == 4 and all("best val mAP 0." in line for line in said), said
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary/sweep_summary.json",
                                                        str(tmp_path))).read_text())
    assert len(summary["finished"]) == 4 and not summary["failed"]
    assert {row["backbone"] for row in summary["best"]} == {"test_resnet_pretrained", "test_resnet_scratch"}
    for row in summary["best"]:
        chosen = max((run for run in children if run.data.tags["mlexp.init"] in row["backbone"]),
                     key=lambda run: run.data.metrics["best/val_map"])
        assert row["run_id"] == chosen.info.run_id and row["best_val_map"] == chosen.data.metrics["best/val_map"]
        assert row["runs"] == 2 and row["total_time_s"] == pytest.approx(sum(
            run.data.metrics["time/total_s"] for run in children if run.data.tags["mlexp.init"] in row["backbone"]))
    assert summary["total_time_s"] == pytest.approx(sum(run.data.metrics["time/total_s"] for run in children))

    # compare: the pretrained/scratch pairs (matched on seed) measured on the detectors' own best val mAP
    out = tmp_path / "cmp"
    compared = run_mlexp(["compare", "--experiment", "detect-sweep", "--out", str(out), "--log-run", "false"],
                         subprocess_env(sqlite_uri), tmp_path)
    assert compared.returncode == 0, compared.stdout[-3000:] + compared.stderr[-2000:]
    with open(out / "comparisons.csv") as table:
        [gain] = [row for row in csv.DictReader(table) if row["kind"] == "init"]
    by_init = {init: {run.data.params["seed"]: run.data.metrics["best/val_map"] for run in children
                      if run.data.tags["mlexp.init"] == init} for init in ("pretrained", "scratch")}
    expected = sum(by_init["pretrained"][seed] - by_init["scratch"][seed] for seed in ("1", "2")) / 2
    assert int(gain["n"]) == 2 and float(gain["mean_diff"]) == pytest.approx(expected)
    assert json.loads((out / "compare.json").read_text())["metric"] == "best/val_map"
    report = (out / "report.md").read_text()
    assert "best/val_map" in report and "accuracy" not in report and "val/acc" not in report
    with open(out / "groups.csv") as table:
        columns = next(csv.reader(table))
    assert "best_val_map_mean" in columns and not any("acc" in column for column in columns), columns
    assert (out / "val_map_curves.png").is_file() and (out / "best_map_bar.png").is_file()
    # monitor's summary ranks them by it, and says it is mAP
    summary = run_mlexp(["monitor", "--summary", "true", "--experiment", "detect-sweep"], subprocess_env(sqlite_uri),
                        tmp_path)
    assert summary.returncode == 0 and "4 finished training run(s)" in summary.stdout, summary.stderr[-2000:]
    best = max(run.data.metrics["best/val_map"] for run in children)
    assert "best val score" in summary.stdout and f"{100 * best:.1f}% mAP" in summary.stdout, summary.stdout


def test_a_detector_killed_mid_epoch_resumes_with_one_point_per_step(scenes, sqlite_uri, tmp_path):
    """SIGKILL after optimizer step 5 (inside epoch 2 of 3, 3 steps an epoch), then `--resume`:
    the run finishes with exactly one point of the loss and of each component per step."""
    root = write_yolo(tmp_path / "yolo", scenes[:30])  # 24 train images: 3 steps of 8 an epoch
    args = ["train", "--task", "detection", "--backbone", "test_resnet", "--init", "scratch", "--data", str(root),
            "--img-size", "64", "--epochs", "3", "--batch-size", "8", "--scratch-epochs-mult", "1",
            "--system-metrics", "false", "--experiment", "detect-resume"]
    env = subprocess_env(sqlite_uri)
    killed = run_mlexp(args, {**env, "MLEXP_FAULT": "step=5"}, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "detect-resume")
    assert steps(client, run.info.run_id, "val/map") == [1]  # killed inside epoch 2
    resumed = run_mlexp(["train", "--resume", run.info.run_id], env, tmp_path)
    assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr[-3000:]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    for key in ("batch/loss", *(f"batch/{name}" for name in COMPONENTS)):
        assert steps(client, run.info.run_id, key) == list(range(1, 10)), key
    for key in ("val/map", "train/loss_classifier"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key


def test_mlflow_models_serve_of_the_best_logged_detector_answers_boxes_labels_and_scores(scenes, sqlite_uri, tmp_path):
    """The run logs its best and final detectors as MLflow models; `mlexp register` names the
    best; `mlflow models serve` of it answers a POST of 2 images (of another size than training's) with each image's boxes,
    class names and scores, as the same weights give them in this process."""
    from tests.e2e.test_models_e2e import served_predictions

    root = write_yolo(tmp_path / "yolo", scenes[:24])
    env = subprocess_env(sqlite_uri)
    done = run_mlexp(["train", "--task", "detection", "--backbone", "test_resnet", "--init", "scratch", "--data",
                      str(root), "--img-size", "64", "--epochs", "1", "--batch-size", "8", "--system-metrics",
                      "false", "--experiment", "detect-serve"], env, tmp_path)
    assert done.returncode == 0 and "logged models best and final" in done.stdout, done.stderr[-3000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "detect-serve")
    models = {model.name: model for model in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")}
    assert set(models) == {"best", "final"}
    registered = run_mlexp(["register", "--name", "digit-detector", "--experiment", "detect-serve"], env, tmp_path)
    assert registered.returncode == 0, registered.stderr[-2000:]
    assert "object detector" in client.get_registered_model("digit-detector").description
    assert f"logged model {models['best'].model_id}" in registered.stdout
    images = np.stack([np.asarray(Image.fromarray(pixels).resize((80, 80))) for pixels, _ in scenes[40:42]])
    served = served_predictions("models:/digit-detector@champion", images, env, tmp_path)
    assert list(served.columns) == ["boxes", "labels", "scores"] and len(served) == 2
    local = mlflow.pyfunc.load_model(f"models:/{models['best'].model_id}").predict(images)
    for answer, expected in zip(served.to_dict("records"), local.to_dict("records")):
        assert len(answer["boxes"]) == len(answer["labels"]) == len(answer["scores"]) == len(expected["boxes"])
        assert set(answer["labels"]) <= set(CLASSES)
        assert all(0 <= x <= 80 for box in answer["boxes"] for x in box) and answer["scores"] == sorted(
            answer["scores"], reverse=True)
        assert np.allclose(np.reshape(answer["boxes"], (-1, 4)), np.reshape(expected["boxes"], (-1, 4)), atol=1e-3)
    assert sum(len(boxes) for boxes in served["boxes"]) > 0  # something to compare: the test can fail


def test_mit_b0_trains_a_classifier_and_a_detector_from_scratch(scenes, sqlite_uri, tmp_path):
    """MiT (SegFormer's encoder, from segmentation-models-pytorch; timm has none) is a backbone
    like timm's: one epoch of classification on digits and of detection on the scenes, each
    FINISHED with its task's metrics, the detector over the encoder's four stages."""
    env = subprocess_env(sqlite_uri)
    common = ["--backbone", "mit_b0", "--init", "scratch", "--epochs", "1", "--system-metrics", "false",
              "--log-models", "false"]
    classified = run_mlexp(["train", *common, "--data", "digits", "--img-size", "32", "--calibrate", "false",
                            "--experiment", "mit"], env, tmp_path)
    assert classified.returncode == 0, classified.stderr[-3000:]
    root = write_yolo(tmp_path / "yolo", scenes[:24])
    detected = run_mlexp(["train", *common, "--task", "detection", "--data", str(root), "--img-size", "64",
                          "--batch-size", "8", "--experiment", "mit"], env, tmp_path)
    assert detected.returncode == 0, detected.stderr[-3000:]
    client = MlflowClient(sqlite_uri)
    runs = {run.data.params["task"]: run for run in runs_of(client, "mit")}
    assert {run.info.status for run in runs.values()} == {"FINISHED"} and set(runs) == {"classification", "detection"}
    assert runs["classification"].data.params["backbone"] == "mit_b0" and runs["classification"].data.metrics[
        "val/acc"] > 0.5  # ten classes: well above chance after one epoch
    assert "val/map" in runs["detection"].data.metrics
    assert steps(client, runs["detection"].info.run_id, "batch/loss_box_reg") == [1, 2]  # 19 train images, 8 a batch, the partial one dropped


def test_a_linear_probe_of_a_pretrained_detector_keeps_the_backbone_as_its_weights_file_has_it(scenes, sqlite_uri,
                                                                                              tmp_path):
    """`--strategy linear` on a detector: the heads (pyramid, RPN, box head) learn, the backbone's
    tensors end exactly as the pretrained file gave them."""
    from safetensors.torch import load_file

    weights = write_pretrained_weights(tmp_path / "weights", "test_resnet", "test_resnet")
    root = write_yolo(tmp_path / "yolo", scenes[:24])
    done = run_mlexp(["train", "--task", "detection", "--backbone", "test_resnet", "--init", "pretrained",
                      "--strategy", "linear", "--data", str(root), "--img-size", "64", "--epochs", "1",
                      "--batch-size", "8", "--system-metrics", "false", "--log-models", "false",
                      "--experiment", "detect-linear"],
                     subprocess_env(sqlite_uri, MLEXP_WEIGHTS_DIR=str(tmp_path / "weights")), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "detect-linear")
    assert run.info.status == "FINISHED" and run.data.params["strategy"] == "linear"
    final = load_file(client.download_artifacts(run.info.run_id, "checkpoints/final/model.safetensors", str(tmp_path)))
    given = load_file(str(weights))
    body = {key.removeprefix("backbone.body."): value for key, value in final.items() if key.startswith("backbone.body.")}
    assert body and all(torch.equal(value, given[key]) for key, value in body.items() if value.is_floating_point())
    heads = sum(value.numel() for key, value in final.items() if key.startswith(("backbone.fpn.", "rpn.", "roi_heads."))
                and value.is_floating_point() and "running_" not in key)
    assert run.data.metrics["train/trainable_params"] == heads  # what trained: the heads, all of them


def test_a_detector_under_torchrun_is_one_ddp_run_scored_on_each_validation_image_once(scenes, sqlite_uri, tmp_path):
    """Two processes (gloo): one run, ranks in sync, half the steps; and its val mAPs are those
    of its best weights on the validation images, each counted once (7 images on 2 ranks: the
    loader repeats one to even them out, and the score must not count it twice)."""
    root = write_yolo(tmp_path / "yolo", scenes[:32])
    env = subprocess_env(sqlite_uri)
    args = ["--task", "detection", "--backbone", "test_resnet", "--init", "scratch", "--data", str(root),
            "--img-size", "64", "--epochs", "2", "--batch-size", "4", "--scratch-epochs-mult", "1", "--system-metrics",
            "false", "--log-models", "true", "--experiment", "detect-ddp"]
    rank0, rank1 = torchrun_train(args, env, tmp_path)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "detect-ddp")
    assert run.info.status == "FINISHED" and run.data.params["distributed_type"] == "MULTI_CPU"
    for key in ("batch/loss", *(f"batch/{name}" for name in COMPONENTS)):  # 25 images, 2 x 4 a step: 3 steps an epoch
        assert steps(client, run.info.run_id, key) == list(range(1, 7)), key
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), "task": "detection", "data": str(root), "img_size": 64})
    evaluated_as_its_run_validated(client, run.info.run_id, val_images_folder(cfg, scenes, "yolo", tmp_path / "val"),
                                   tmp_path)
