"""`--in-chans N`: images with more than RGB (here 5 channels: the RGB pixels plus two more
bands built from them, as a depth or thermal band would come), stacked in NumPy files and in
TIFFs (bands interleaved, and planar) side by side; a
classifier and a detector train on them, a pretrained stem is adapted as timm adapts it, and
a folder whose images do not have N channels stops before any run exists. A detector also reads
its extra bands from folders beside its images (`--bands depth,thermal`)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import tifffile
import timm
import torch
from mlflow import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from mlexp.models.weight_files import load_weights
from mlexp.tasks.detection.annotations import read_split
from mlexp.tasks.detection.images import read_pixels
from tests.detection_data import digit_scenes
from tests.helpers import run_mlexp, runs_of, steps, subprocess_env, write_pretrained_weights

pytestmark = pytest.mark.slow
CHANNELS = 5


def five_bands(rgb: np.ndarray) -> np.ndarray:
    """RGB plus an inverted-luminance band and a gradient band: height x width x 5, uint8."""
    grey = rgb.mean(axis=-1)
    ramp = np.linspace(0, 255, rgb.shape[1])[None, :].repeat(rgb.shape[0], axis=0)
    return np.dstack([rgb, 255 - grey, ramp]).astype(np.uint8)


def save_stack(path: Path, bands: np.ndarray, n: int) -> None:
    """One in three as a .npy, one as a TIFF of interleaved bands, one as a planar TIFF (bands first)."""
    if n % 3 == 0:
        np.save(path.with_suffix(".npy"), bands)
    elif n % 3 == 1:
        tifffile.imwrite(path.with_suffix(".tif"), bands, photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path.with_suffix(".tiff"), bands.transpose(2, 0, 1), photometric="minisblack",
                         planarconfig="separate")


def write_digit_stacks(root: Path, per_class: int = 150) -> Path:
    digits = load_digits()
    for label in range(10):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            grey = (digits.images[index] * 16).clip(0, 255).astype(np.uint8)
            save_stack(folder / f"{n:03d}", five_bands(np.dstack([grey] * 3)), n)
    return root


def test_a_pretrained_stem_is_adapted_to_five_channels_as_timm_adapts_it(tmp_path):
    weights = write_pretrained_weights(tmp_path, "test_resnet", "test_resnet")
    rgb = timm.create_model("test_resnet", num_classes=1000)
    rgb.load_state_dict(load_weights_file(weights))
    model = timm.create_model("test_resnet", num_classes=1000, in_chans=CHANNELS)
    report = load_weights(model, weights, "test_resnet")
    assert not report.new and not report.unused  # every tensor taken: the stem adapted, not left new
    stem, original = model.conv1[0].weight.detach(), rgb.conv1[0].weight.detach()
    assert stem.shape[1] == CHANNELS
    # timm's rule: the RGB filters repeated over the channels (R, G, B, R, G), scaled by 3/5
    assert torch.allclose(stem, original[:, [0, 1, 2, 0, 1]] * 3 / CHANNELS)
    assert torch.equal(model.fc.weight, rgb.fc.weight)


def load_weights_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_classifier_and_a_detector_train_on_five_channel_stacks(sqlite_uri, tmp_path):
    env = subprocess_env(sqlite_uri, MLEXP_WEIGHTS_DIR=str(tmp_path / "weights"))
    write_pretrained_weights(tmp_path / "weights", "test_resnet", "test_resnet")
    data = write_digit_stacks(tmp_path / "stacks")
    classified = run_mlexp(["train", "--backbone", "test_resnet", "--init", "pretrained", "--in-chans", "5",
                            "--data", str(data), "--img-size", "16", "--epochs", "3", "--calibrate", "false",
                            "--system-metrics", "false", "--experiment", "bands"], env, tmp_path)
    assert classified.returncode == 0, classified.stdout[-2000:] + classified.stderr[-3000:]

    scenes = digit_scenes(24, size=64)
    (tmp_path / "boxes" / "images").mkdir(parents=True)
    (tmp_path / "boxes" / "labels").mkdir()
    for n, (pixels, boxes) in enumerate(scenes):
        save_stack(tmp_path / "boxes" / "images" / f"scene{n:03d}", five_bands(pixels), n)
        (tmp_path / "boxes" / "labels" / f"scene{n:03d}.txt").write_text("".join(
            f"{label} {(x + w / 2) / 64:.6f} {(y + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}\n"
            for label, (x, y, w, h) in boxes))
    detected = run_mlexp(["train", "--task", "detection", "--backbone", "test_resnet", "--init", "scratch",
                          "--in-chans", "5", "--data", str(tmp_path / "boxes"), "--img-size", "64", "--epochs", "1",
                          "--batch-size", "8", "--system-metrics", "false", "--log-models", "false",
                          "--experiment", "bands"], env, tmp_path)
    assert detected.returncode == 0, detected.stdout[-2000:] + detected.stderr[-3000:]

    client = MlflowClient(sqlite_uri)
    runs = {run.data.params["task"]: run for run in runs_of(client, "bands")}
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    assert {run.data.params["in_chans"] for run in runs.values()} == {"5"}
    classifier = runs["classification"]
    assert classifier.data.metrics["best/val_acc"] > 0.3  # ten classes: well above chance (0.1)
    assert len(steps(client, classifier.info.run_id, "val/acc")) == 3
    assert "val/map" in runs["detection"].data.metrics
    assert steps(client, runs["detection"].info.run_id, "batch/loss_rpn_box_reg") == [1, 2]


def test_images_without_the_asked_channels_stop_before_any_run(sqlite_uri, tmp_path):
    env = subprocess_env(sqlite_uri)
    data = write_digit_stacks(tmp_path / "stacks", per_class=4)
    cases = {("--data", str(data)): "has 5 channel(s) but --in-chans is 3: train with --in-chans 5",
             ("--data", str(data), "--in-chans", "4"): "has 5 channel(s) but --in-chans is 4",
             ("--data", "digits", "--in-chans", "5"): "the built-in 'digits' images are RGB"}
    for extra, said in cases.items():
        done = run_mlexp(["train", "--backbone", "test_resnet", "--init", "scratch", *extra, "--epochs", "1",
                          "--experiment", "refused"], env, tmp_path)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, (extra, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not runs_of(MlflowClient(sqlite_uri), "refused")


def write_banded_scenes(root: Path, scenes) -> Path:
    """A YOLO folder whose images are RGB PNGs, with a depth band beside them as greyscale PNGs
    and a thermal band as one-channel .npy files: five_bands' channels, in three folders."""
    for folder in ("images", "labels", "depth", "thermal"):
        (root / folder).mkdir(parents=True)
    for n, (pixels, boxes) in enumerate(scenes):
        bands = five_bands(pixels)
        Image.fromarray(bands[..., :3]).save(root / "images" / f"scene{n:03d}.png")
        Image.fromarray(bands[..., 3]).save(root / "depth" / f"scene{n:03d}.png")
        np.save(root / "thermal" / f"scene{n:03d}.npy", bands[..., 4:])
        (root / "labels" / f"scene{n:03d}.txt").write_text("".join(
            f"{label} {(x + w / 2) / 64:.6f} {(y + h / 2) / 64:.6f} {w / 64:.6f} {h / 64:.6f}\n"
            for label, (x, y, w, h) in boxes))
    return root


def test_a_detector_reads_its_extra_bands_from_folders_beside_its_images(sqlite_uri, tmp_path):
    scenes = digit_scenes(24, size=64)
    root = write_banded_scenes(tmp_path / "banded", scenes)
    split = read_split(root, ("depth", "thermal"))
    for item in split.images:  # read as the one stack they were cut from
        assert np.array_equal(read_pixels(item, CHANNELS), five_bands(scenes[int(item.path.stem[5:])][0]))
    env = subprocess_env(sqlite_uri)
    args = ["train", "--task", "detection", "--backbone", "test_resnet", "--init", "scratch", "--in-chans", "5",
            "--bands", "depth,thermal", "--data", str(root), "--img-size", "64", "--epochs", "1", "--batch-size", "8",
            "--system-metrics", "false", "--experiment", "banded"]
    detected = run_mlexp(args, env, tmp_path)
    assert detected.returncode == 0, detected.stdout[-2000:] + detected.stderr[-3000:]
    client = MlflowClient(sqlite_uri)
    [run] = runs_of(client, "banded")
    assert run.info.status == "FINISHED" and run.data.params["bands"] == "depth,thermal"
    [best] = [model for model in client.search_logged_models([run.info.experiment_id]) if model.name == "best"]
    served = mlflow.pyfunc.load_model(f"models:/{best.model_id}")
    assert served.metadata.get_input_schema().inputs[0].shape[-1] == CHANNELS  # a client sends the five bands
    evaluated = run_mlexp(["evaluate", "--model", f"runs:/{run.info.run_id}", "--data", str(root), "--experiment",
                           "banded-evaluate"], env, tmp_path)  # the model knows its band folders
    assert evaluated.returncode == 0 and "test mAP" in evaluated.stdout, evaluated.stderr[-3000:]

    (root / "thermal" / "scene005.npy").unlink()
    refusals = {tuple(args): f"{root / 'images' / 'scene005.png'}: no thermal file of the same name",
                ("train", "--backbone", "test_resnet", "--bands", "depth", "--data", str(root), "--experiment",
                 "banded-refused"): "--bands reads band folders beside a detection folder's images/"}
    for refused, said in refusals.items():
        done = run_mlexp([*refused[:-1], "banded-refused"], env, tmp_path)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not runs_of(client, "banded-refused")
