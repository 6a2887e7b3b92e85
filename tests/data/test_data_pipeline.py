"""The data pipeline follows the backbone's timm data config; every image mode arrives as a
3-channel tensor of the right range; `auto` options resolve from the device's capabilities;
loader workers change nothing but speed."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import weakref
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mlflow import MlflowClient
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms
from torchvision.transforms import functional as F

from mlexp.config import TrainConfig, config_hash
from mlexp.data.images import CheckedImageFolder
from mlexp.data.loading import EpochSeeded
from mlexp.data.sources import check_data_source
from mlexp.data.transforms import build_transforms, data_config
from mlexp.errors import MlexpError
from mlexp.training import hardware
from tests.helpers import run_mlexp, subprocess_env

# Two backbones whose pretrained configs differ: ImageNet statistics and crop 0.95 (ResNet
# strikes back weights), mean = std = 0.5 and crop 0.9 (AugReg ViT).
MODELS = {"resnet18": dict(backbone="resnet18", init="scratch"),
          "vit_small_patch16_224.augreg_in21k": dict(backbone="vit_small_patch16_224.augreg_in21k", init="scratch")}


def photo(size=(96, 80), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def real_photo() -> Image.Image:
    """scikit-learn's flower photo (offline), shrunk: saturated reds, greens and blues."""
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[1]).resize((120, 80), Image.BICUBIC)


@pytest.mark.parametrize("timm_name", list(MODELS))
def test_transforms_are_timms_for_the_models_own_data_config(timm_name, tmp_path):
    cfg = TrainConfig(data=str(tmp_path), img_size=64, **MODELS[timm_name])
    # timm's train.py: the data config of the model itself, at the run's input size
    reference = resolve_data_config({"input_size": (3, 64, 64)}, model=timm.create_model(timm_name))
    ours = data_config(cfg)
    assert (tuple(ours["mean"]), tuple(ours["std"])) == (reference["mean"], reference["std"])
    assert ours["interpolation"] == reference["interpolation"] and ours["crop_pct"] == reference["crop_pct"]
    assert ours["train_crop"] == "random-resized" and ours["hflip"] == 0.5  # an image folder's defaults
    image = photo()
    theirs_eval = create_transform(**reference, is_training=False)
    assert torch.equal(build_transforms(cfg, train=False)(image), theirs_eval(image))
    theirs_train = create_transform(**reference, is_training=True, hflip=0.5, color_jitter=0.4, re_mode="pixel")
    for seed in range(3):  # random-resized crop, flip, jitter: the same draws give the same tensor
        random.seed(seed), torch.manual_seed(seed)
        mine = build_transforms(cfg, train=True)(image)
        random.seed(seed), torch.manual_seed(seed)
        assert torch.equal(mine, theirs_train(image))
    assert mine.shape == (3, 64, 64)


def test_the_two_models_really_differ_and_tiny_images_keep_a_plain_resize():
    resnet = data_config(TrainConfig(**MODELS["resnet18"]))
    vit = data_config(TrainConfig(**MODELS["vit_small_patch16_224.augreg_in21k"]))
    assert vit["mean"] == [0.5, 0.5, 0.5] and resnet["mean"] == pytest.approx([0.485, 0.456, 0.406])
    digits = TrainConfig(data="digits", img_size=16, **MODELS["resnet18"])
    assert data_config(digits)["train_crop"] == "resize" and data_config(digits)["hflip"] == 0.0
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("RGB")
    whole = build_transforms(digits, train=True)(image)
    assert whole.shape == (3, 16, 16) and torch.equal(whole, build_transforms(digits, train=False)(image))


@pytest.mark.parametrize("crop", ["random-resized", "resize"])
def test_a_randaugment_policy_timm_would_misread_is_refused(crop):
    folder = dict(data="/photos", img_size=32, train_crop=crop, **MODELS["resnet18"])
    assert build_transforms(TrainConfig(aa="rand-m9-n2-mstd0.5", **folder), train=True) is not None
    for policy, says in [("augmix-m5", "must be a RandAugment policy"), ("rand-zz", "section 'zz' means nothing"),
                         ("rand-m9-q3", "not a valid RandAugment policy")]:
        with pytest.raises(MlexpError, match=says):
            build_transforms(TrainConfig(aa=policy, **folder), train=True)
        with pytest.raises(MlexpError, match=says):  # the check before any run starts
            check_data_source(TrainConfig(aa=policy, data="digits", train_crop=crop, **MODELS["resnet18"]))


def seeded(seed: int, transform, image):
    """`transform(image)` with Python's and torch's generators seeded, as EpochSeeded seeds them."""
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def as_image(tensor: torch.Tensor, config: dict) -> Image.Image:
    """A normalised tensor back to the 8-bit image it was made from."""
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    return F.to_pil_image((tensor * std + mean).clamp(0, 1))


@pytest.mark.parametrize("crop", ["random-resized", "resize"])
def test_rotate_turns_training_images_by_torchvisions_random_angle_with_bare_corners_in_the_mean(crop):
    cfg = TrainConfig(data="/photos", img_size=64, train_crop=crop, color_jitter=0, **MODELS["resnet18"])
    config, image = data_config(cfg), real_photo()
    interpolation = transforms.InterpolationMode(config["interpolation"])
    fill = [round(255 * m) for m in config["mean"]]
    assert config["rotate"] == 0.0 and data_config(cfg.replace(rotate=30))["rotate"] == 30.0
    plain, rotated = build_transforms(cfg, train=True), build_transforms(cfg.replace(rotate=90), train=True)
    for seed in (1, 9):
        mine = seeded(seed, rotated, image)
        # the reference: the same crop (or resize), then torchvision's rotation by the angle drawn next
        random.seed(seed), torch.manual_seed(seed)
        if crop == "resize":
            cropped = F.resize(image, [64, 64], interpolation=interpolation)
        else:
            cropped = create_transform(64, is_training=True, hflip=0.5, interpolation=config["interpolation"],
                                       separate=True)[0](image)
        angle = transforms.RandomRotation.get_params([-90.0, 90.0])
        turned = F.rotate(cropped, angle, interpolation=interpolation, fill=fill)
        assert torch.equal(mine, F.normalize(F.to_tensor(turned), config["mean"], config["std"]))
        assert 15 < abs(angle) < 75  # these seeds' angles: every corner is bare
        unrotated = seeded(seed, plain, image)
        assert not torch.allclose(mine, unrotated, atol=0.1)
        for corner in (mine[:, 0, 0], mine[:, -1, -1], mine[:, 0, -1], mine[:, -1, 0]):
            assert corner.abs().max() < 0.02  # the mean colour, normalised: the photo is gone there
        assert unrotated[:, 0, 0].abs().max() > 0.1
        assert torch.equal(mine, seeded(seed, build_transforms(cfg.replace(rotate=90), train=True), image))


def hue_and_value(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    hsv = np.asarray(image.convert("HSV")).astype(float) / 255
    return hsv[..., 0], hsv[..., 2]


@pytest.mark.parametrize("crop", ["random-resized", "resize"])
def test_a_hue_jitter_shifts_the_hue_of_a_real_photo_and_keeps_its_brightness(crop):
    cfg = TrainConfig(data="/photos", img_size=64, train_crop=crop, **MODELS["resnet18"])
    hue_only = cfg.replace(color_jitter="0,0,0,0.5")
    assert data_config(hue_only)["color_jitter"] == "0.0,0.0,0.0,0.5"
    image = real_photo()
    for seed in (0, 1):  # the same crop either way; only the colour differs
        before = as_image(seeded(seed, build_transforms(cfg.replace(color_jitter=0), train=True), image),
                          data_config(cfg))
        after = as_image(seeded(seed, build_transforms(hue_only, train=True), image), data_config(cfg))
        (hue_before, value_before), (hue_after, value_after) = hue_and_value(before), hue_and_value(after)
        turned = np.abs(hue_after - hue_before)
        turned = np.minimum(turned, 1 - turned)  # hue is an angle
        assert np.median(turned) > 0.05, seed  # a shift of over 18 degrees of hue
        assert np.abs(value_after - value_before).mean() < 0.03  # brightness kept


def test_colour_jitter_reaches_whole_image_resizes_as_torchvisions_and_is_off_there_by_default():
    cfg = TrainConfig(data="/photos", img_size=32, train_crop="resize", **MODELS["resnet18"])
    config, image = data_config(cfg), real_photo()
    assert config["color_jitter"] == 0.0 and data_config(cfg.replace(color_jitter=0.4))["color_jitter"] == 0.4
    plain = build_transforms(cfg, train=False)(image)
    assert torch.equal(seeded(0, build_transforms(cfg, train=True), image), plain)  # the default: no jitter
    for jitter, factors in ((0.4, (0.4, 0.4, 0.4)), ("0.2,0.3,0.4,0.1", (0.2, 0.3, 0.4, 0.1))):
        reference = transforms.Compose([
            transforms.Resize((32, 32), interpolation=transforms.InterpolationMode(config["interpolation"])),
            transforms.ColorJitter(*factors), transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
        mine = seeded(1, build_transforms(cfg.replace(color_jitter=jitter), train=True), image)
        assert torch.equal(mine, seeded(1, reference, image)) and not torch.allclose(mine, plain, atol=0.05)
    with_aa = cfg.replace(color_jitter=0.4, aa="rand-m9-n2-mstd0.5")  # RandAugment replaces the jitter
    assert data_config(with_aa)["color_jitter"] == 0.0
    assert not any(isinstance(step, transforms.ColorJitter) for step in build_transforms(with_aa, True).transforms)


def test_the_jitter_and_rotation_are_recorded_as_the_pipelines_apply_them():
    folder = TrainConfig(data="/photos", **MODELS["resnet18"])
    assert (data_config(folder)["color_jitter"], data_config(folder)["rotate"]) == (0.4, 0.0)  # timm's default
    assert data_config(folder.replace(aa="rand-m9-mstd0.5"))["color_jitter"] == 0.0
    assert data_config(TrainConfig(**MODELS["resnet18"]))["color_jitter"] == 0.0  # digits: none, as before
    asked = folder.replace(data="digits", color_jitter="0.4,0.4,0.4,0.1", rotate=10)
    assert (data_config(asked)["color_jitter"], data_config(asked)["rotate"]) == ("0.4,0.4,0.4,0.1", 10.0)
    # timm gets the four factors, so its ColorJitter shifts hue too
    jitter = [step for step in build_transforms(folder.replace(color_jitter="0.4,0.4,0.4,0.1"), True).transforms
              if isinstance(step, transforms.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].hue == (-0.1, 0.1) and jitter[0].brightness == (0.6, 1.4)


def test_every_image_mode_loads_as_a_3_channel_tensor_of_the_right_range(tmp_path):
    """Grayscale, RGBA, palette and 16-bit PNGs through the folder and the run's transform."""
    folder = tmp_path / "modes"
    ramp = np.tile(np.linspace(0, 1, 32), (32, 1))
    files = {
        "gray": Image.fromarray((ramp * 255).round().astype(np.uint8)),  # L
        "sixteen": Image.fromarray((ramp * 65535).round().astype(np.uint16)),  # I;16
        "rgba": Image.fromarray(np.dstack([(ramp * 255).astype(np.uint8)] * 3 + [np.full((32, 32), 255, np.uint8)])),
        "palette": Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("P"),
    }
    for name, image in files.items():
        (folder / name).mkdir(parents=True)
        image.save(folder / name / "0.png")
    assert Image.open(folder / "sixteen" / "0.png").mode == "I;16"
    assert Image.open(folder / "palette" / "0.png").mode == "P"
    assert Image.open(folder / "rgba" / "0.png").mode == "RGBA"
    cfg = TrainConfig(data=str(folder), img_size=32, train_crop="resize", **MODELS["resnet18"])
    config = data_config(cfg)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    dataset = CheckedImageFolder(folder, transform=build_transforms(cfg, train=False))
    for tensor, label in dataset:
        pixels = tensor * std + mean  # back to 0..1
        name = dataset.classes[label]
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32, name
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5, name
        assert pixels.min() < 0.02 and pixels.max() > 0.98, name  # the full ramp, not clipped or flat
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


@pytest.mark.parametrize("augmentations", [{}, {"rotate": 30, "color_jitter": "0.4,0.4,0.4,0.1"},
                                           {"train_crop": "resize", "rotate": 30, "color_jitter": "0.4,0.4,0.4,0.1"}])
def test_augmentations_depend_on_seed_epoch_and_image_only(augmentations):
    cfg = TrainConfig(data="folder", img_size=32, **MODELS["resnet18"], **augmentations)

    class Photos(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return build_transforms(cfg, train=True)(photo(seed=index)), index

    seeded = EpochSeeded(Photos(), seed=7)
    seeded.set_epoch(1)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = [seeded[i][0] for i in range(4)]
    assert torch.equal(torch.rand(1), expected)  # training's own random stream is untouched
    seeded.set_epoch(2)
    assert not torch.equal(seeded[0][0], first[0])  # a new epoch, new crops
    seeded.set_epoch(1)
    assert all(torch.equal(seeded[i][0], first[i]) for i in (3, 1))  # any order, any process: the same
    loader = torch.utils.data.DataLoader(seeded, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (2, 1):  # workers forked once see each new epoch
        seeded.set_epoch(epoch)
        batches = torch.cat([images for images, _ in loader])
    assert all(torch.equal(batches[i], first[i]) for i in range(4))


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_mixed_precision_auto_follows_the_device(bf16, expected):
    assert hardware.choose_precision("auto", "cuda", bf16) == expected
    assert hardware.choose_precision("auto", "cpu", False) == "no"
    assert hardware.choose_precision("auto", "mps", True) == "no"
    assert hardware.choose_precision("no", "cuda", bf16) == "no"  # asked for: kept
    assert hardware.choose_precision("fp16", "cuda", True) == "fp16"
    assert hardware.device_precision("auto") == ("no" if not torch.cuda.is_available() else
                                                 "bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_channels_last_auto_is_for_cnns_on_a_gpu_and_resnets_on_a_cpu_and_workers_share_the_cpus():
    cnn, vit = timm.create_model("test_resnet"), timm.create_model("test_vit")
    assert hardware.is_convolutional(cnn) and not hardware.is_convolutional(vit)
    assert hardware.choose_channels_last("auto", "cuda", True, "vgg") is True
    assert hardware.choose_channels_last("auto", "cuda", False, "vit") is False
    assert hardware.choose_channels_last("auto", "cpu", True, "resnet") is True
    assert hardware.choose_channels_last("auto", "cpu", True, "vgg") is False  # slower there
    assert hardware.choose_channels_last("auto", "cpu", True, "other") is False  # not measured: left as it is
    assert hardware.choose_channels_last("auto", "cpu", False, "vit") is False
    assert hardware.choose_channels_last("true", "cpu", False, "vit") is True
    assert hardware.choose_channels_last("false", "cuda", True, "resnet") is False
    folder = TrainConfig(data="photos")
    assert hardware.worker_count(folder, built_in=False, environ={}, cpus=16) == 8
    assert hardware.worker_count(folder, built_in=False, environ={"LOCAL_WORLD_SIZE": "4"}, cpus=16) == 4
    assert hardware.worker_count(folder, built_in=False, environ={"OMP_NUM_THREADS": "3"}, cpus=16) == 3
    assert hardware.worker_count(folder, built_in=False, environ={"LOCAL_WORLD_SIZE": "8"}, cpus=4) == 1
    assert hardware.worker_count(folder, built_in=True, environ={}, cpus=16) == 0
    assert hardware.worker_count(folder.replace(workers=0), built_in=False, environ={}, cpus=16) == 0
    assert TrainConfig.from_strings({"workers": "auto"}).workers == -1


# A fresh process per arm: the allocator's settings are process-wide.
TRAINING_STEPS = """
import json, resource, sys, timm, torch
from mlexp.training import hardware
if sys.argv[1] == "keep":
    assert hardware.keep_freed_memory()
torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=10)
images, labels = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
def step():
    torch.nn.functional.cross_entropy(model(images), labels).backward()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults(); step(); first = faults() - before  # the first step faults its buffers in, either way
step()
per_step = []
for _ in range(10):
    before = faults(); step(); per_step.append(faults() - before)
print(json.dumps({"first": first, "per_step": per_step}))
"""


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_kept_freed_memory_is_reused_without_page_faults():
    def faults(arm: str) -> dict:
        done = subprocess.run([sys.executable, "-c", TRAINING_STEPS, arm], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1])

    # Without the change a step usually faults its activations in again (8,000-16,000 faults a
    # step, half a first step's), but glibc's own sliding mmap threshold sometimes keeps them too
    # (60 a step): that arm is printed, not asserted. With the change the usual step faults
    # nothing (0 measured); now and then one step grows the heap (26-5,048 once), so the median
    # step is what is asserted, against the first step's faults on the same machine.
    print("faults per step, glibc's default:", faults("default"))
    kept = faults("keep")
    print("faults per step, freed memory kept:", kept)
    assert statistics.median(kept["per_step"]) < kept["first"] / 100


def test_configs_recorded_before_these_options_keep_their_meaning_and_hash():
    recorded = TrainConfig().to_dict()
    for name in ("train_crop", "color_jitter"):
        del recorded[name]
    recorded |= {"channels_last": False, "hflip": 0.0, "workers": 0, "mixed_precision": "no"}
    old = TrainConfig.from_dict(recorded)
    assert (old.train_crop, old.color_jitter, old.channels_last) == ("resize", 0.0, "false")
    assert config_hash(old) == config_hash(TrainConfig.from_dict(recorded | {"train_crop": "resize"}))
    assert config_hash(old) != config_hash(old.replace(train_crop="random-resized"))


def test_runs_recorded_by_the_previous_release_keep_their_hash_and_train_as_they_did(tmp_path):
    """Release 0.1's runs (digits: whole-image resizes, which ignored the 0.4 jitter they recorded)
    read back with no jitter, and with the hash they were tagged with."""
    with tarfile.open(Path(__file__).resolve().parents[1] / "fixtures" / "release-0.1-store.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    store = tmp_path / "mlexp-fixture-store"
    with sqlite3.connect(store / "mlflow.db") as db:
        tagged = dict(db.execute("select run_uuid, value from tags where key = 'mlexp.config_hash'").fetchall())
    assert len(tagged) == 2
    for run_id, recorded_hash in tagged.items():
        recorded = json.loads(next(store.glob(f"mlruns/*/{run_id}/artifacts/config.json")).read_text())
        assert recorded["color_jitter"] == 0.4 and recorded["data_config"]["train_crop"] == "resize"
        old = TrainConfig.from_dict(recorded)
        assert config_hash(old) == recorded_hash
        assert data_config(old)["color_jitter"] == 0.0 and old.color_jitter is None  # as it trained
        assert TrainConfig.from_dict(old.to_dict()) == old  # and recorded again, read back alike


def test_the_default_jitter_keeps_the_hash_of_every_default_run_and_an_asked_jitter_gets_its_own():
    assert config_hash(TrainConfig()) == "ce837bc2208c46f0"  # every default run so far carries it
    assert config_hash(TrainConfig(data="/photos")) == "0de3a12f28776336"
    # on photos the default is 0.4, as asking for it is; on digits asking for it means a jitter
    assert config_hash(TrainConfig(data="/photos", color_jitter="0.4")) == config_hash(TrainConfig(data="/photos"))
    assert config_hash(TrainConfig(color_jitter=0.4)) != config_hash(TrainConfig())
    assert config_hash(TrainConfig(rotate=10)) != config_hash(TrainConfig())
    # a run recorded since --rotate keeps its jitter (no longer the default's meaning on resizes)
    asked = TrainConfig(color_jitter=0.4)
    assert TrainConfig.from_dict(json.loads(asked.to_json())) == asked


def write_photo_folder(root: Path, per_class: int = 24) -> Path:
    """A small folder of JPEG photos: random crops of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    for name, image in zip(("china", "flower"), load_sample_images().images):
        for part, count in (("train", per_class), ("val", per_class // 3)):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                top, left = rng.integers(0, image.shape[0] - 96), rng.integers(0, image.shape[1] - 96)
                Image.fromarray(image[top:top + 96, left:left + 96]).save(root / part / name / f"{index}.jpg")
    return root


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_image_folders_use_workers_by_default_and_workers_change_nothing_but_speed(sqlite_uri, tmp_path):
    data = write_photo_folder(tmp_path / "photos")
    env = subprocess_env(sqlite_uri, OMP_NUM_THREADS="2")
    common = ["train", "--backbone", "test_resnet", "--init", "scratch", "--data", str(data), "--img-size", "32",
              "--epochs", "2", "--batch-size", "8", "--experiment", "workers", "--log-models", "false"]
    for name, extra in (("auto", []), ("none", ["--workers", "0"])):
        done = run_mlexp([*common, "--run-name", name, *extra], env, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(sqlite_uri)
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name("workers").experiment_id])}
    auto, none = runs["auto"], runs["none"]
    timm_config = resolve_data_config({}, model=timm.create_model("test_resnet"))
    assert auto.data.params["workers"] == "-1" and auto.data.params["effective.workers"] == "2"
    assert none.data.params["effective.workers"] == "0"
    for run in (auto, none):
        assert run.data.metrics["perf/loader_samples_per_s"] > 0 and run.data.metrics["perf/peak_mem_mb"] > 100
        assert run.data.params["data.train_crop"] == "random-resized"
        assert run.data.params["effective.mixed_precision"] == "no"  # auto, on a CPU
        config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json")).read_text())
        assert config["data_config"]["interpolation"] == timm_config["interpolation"]
        assert config["data_config"]["mean"] == list(timm_config["mean"]) and config["effective"]["channels_last"] == "true"
    losses = {name: [point.value for point in sorted(client.get_metric_history(run.info.run_id, "batch/loss"),
                                                     key=lambda point: point.step)] for name, run in runs.items()}
    assert len(losses["auto"]) == 12 and losses["auto"] == losses["none"]  # the same crops, the same model


class WeaklyReferenced(sqlite3.Connection):
    """An SQLite connection a test can watch through a weak reference."""


class CollectingImages(torch.utils.data.Dataset):
    """Tensors whose loading runs the garbage collector, as any allocation-heavy decode may."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        gc.collect()
        return torch.full((3, 4, 4), float(index)), index


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_loader_workers_never_finalize_sqlite_connections_they_inherit(tmp_path):
    """Loader workers are forked while the tracker's threads work in SQLite (the outbox, an
    sqlite:// store). A worker that finalized a connection it inherited would take SQLite's
    memory lock, which a sibling thread may have held at the instant of the fork, and wait
    forever: the training stalls. Here the lock is held for certain: it is taken through
    the SQLite library itself while the workers are forked, and released only after."""
    from torch.utils.data import DataLoader

    from mlexp.data.loading import loader_kwargs

    shared = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libsqlite3" in line}
    if len(shared) != 1:
        pytest.skip("Python's sqlite3 module does not run on one shared libsqlite3 here")
    library = ctypes.CDLL(shared.pop())  # the very library (and lock) Python's sqlite3 module uses
    library.sqlite3_libversion.restype = ctypes.c_char_p
    assert library.sqlite3_libversion().decode() == sqlite3.sqlite_version
    library.sqlite3_mutex_alloc.restype = ctypes.c_void_p
    memory_lock = library.sqlite3_mutex_alloc(3)  # SQLITE_MUTEX_STATIC_MEM, taken by sqlite3_free
    gc.disable()
    try:
        garbage = sqlite3.connect(tmp_path / "inherited.db", factory=WeaklyReferenced)
        garbage.execute("CREATE TABLE t (x)")
        alive = weakref.ref(garbage)
        del garbage
        assert alive() is not None  # a connection is in a reference cycle: only the collector frees it
        library.sqlite3_mutex_enter(ctypes.c_void_p(memory_lock))
        try:
            loader = DataLoader(CollectingImages(), **{**loader_kwargs(TrainConfig(batch_size=4), 2), "timeout": 20})
            labels = [label for _epoch in range(2) for _, batch in loader for label in batch.tolist()]
        finally:
            library.sqlite3_mutex_leave(ctypes.c_void_p(memory_lock))
    finally:
        gc.enable()
    assert sorted(labels) == sorted(list(range(8)) * 2)
    gc.collect()
    assert alive() is None  # the parent still collects it


@pytest.mark.slow  # real processes: `make test`, not `make check`
def test_what_a_tracked_run_froze_stays_frozen_across_its_loaders_forks(sqlite_uri):
    """A tracked run moves what is alive at its start out of the collector's reach (a full
    collection over torch's and MLflow's objects holds the GIL for ~200 ms); forking the loader
    workers must not hand it back, and the run's end leaves the interpreter as it found it."""
    from torch.utils.data import DataLoader

    from mlexp.data.loading import loader_kwargs
    from mlexp.tracking import open_run

    gc.unfreeze()
    tracker = open_run(sqlite_uri, "frozen", "frozen")
    frozen = gc.get_freeze_count()
    assert frozen > 10_000  # the modules' objects, at least
    loader = DataLoader(CollectingImages(), **{**loader_kwargs(TrainConfig(batch_size=4), 2), "timeout": 20})
    assert sorted(label for _, batch in loader for label in batch.tolist()) == list(range(8))
    assert gc.get_freeze_count() >= frozen
    assert tracker.finish("FINISHED").complete
    assert gc.get_freeze_count() == 0
