"""Bad data, sizes and weight URIs are caught before any MLflow run exists, in one line.

Real parts throughout: ImageFolders of tiny PNGs written with PIL, scikit-learn's own
splitters as the judge of which splits are possible, a real SQLite MLflow store, and the
real `mlexp` process for the command-line cases.
"""

from __future__ import annotations

import gc
import itertools
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from mlexp.config import MAX_IMG_SIZE, TrainConfig
from mlexp.data.images import CheckedImageFolder, class_image_counts, digits_arrays, load_rgb_image
from mlexp.data.sources import build_data, check_data_source
from mlexp.data.splits import check_split, split_indices
from mlexp.errors import MlexpError
from mlexp.models.catalogue import resolve_backbone
from mlexp.models.weight_sources import file_sha256, locate_weights
from tests.helpers import run_mlexp, runs_in, subprocess_env


def make_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """An ImageFolder with counts[name] random 8x8 RGB PNGs in each class folder."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def one_line_error(done, *fragments: str) -> str:
    """The single `mlexp: error:` line of a finished `mlexp` process that exited with 2."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlexp: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def check(tmp_path: Path, counts: dict[str, int] | None = None, **options) -> str:
    """check_data_source's message for a folder of `counts` (or for options alone)."""
    if counts is not None:
        options.setdefault("data", str(make_folder(tmp_path / "data", counts)))
    with pytest.raises(MlexpError) as info:
        check_data_source(TrainConfig(**options))
    message = str(info.value)
    assert "\n" not in message
    return message


# --- 1-3 through the real command line: exit 2, one line, no run ----------------------------


CLI_CASES = {
    "class-smaller-than-folds": ({"cat": 5, "dog": 2}, ["--folds", "3"],
                                 ["class 'dog'", "2 image(s)", "--folds 3", "lower --folds to 2",
                                  "add images to 'dog'", "--val-dir"]),
    "class-of-one-image": ({"cat": 5, "dog": 1}, [],
                           ["class 'dog'", "1 image", "at least 2 per class", "--val-dir"]),
    "val-split-leaves-too-few-to-train": ({"a": 2, "b": 2, "c": 2, "d": 2}, ["--val-split", "0.7"],
                                          ["--val-split 0.7 keeps 2 of 8 images", "fewer than its 4 classes",
                                           "lower --val-split"]),
    "img-size-too-large": ({"a": 3, "b": 3}, ["--img-size", "4096"],
                           [f"--img-size must be at most {MAX_IMG_SIZE}, got 4096"]),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_data_and_sizes_fail_before_any_run(tmp_path, case):
    counts, args, fragments = CLI_CASES[case]
    data = make_folder(tmp_path / "data", counts)
    db = tmp_path / "mlflow.db"
    done = run_mlexp(["train", "--backbone", "resnet18_scratch", "--data", str(data), "--epochs", "1",
                      *args], subprocess_env(f"sqlite:///{db}"), cwd=tmp_path, timeout=120)
    one_line_error(done, *fragments)
    assert runs_in(db) == 0


# --- 1 and 2: the split rules are scikit-learn's own ------------------------------------------


def sklearn_refuses(counts: tuple[int, ...], cfg: TrainConfig) -> bool:
    """Does split_indices (scikit-learn) fail, or warn, on these class sizes?"""
    labels = np.repeat(np.arange(len(counts)), counts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            split_indices(labels, cfg)
        except (ValueError, UserWarning):
            return True
    return False


def test_split_rules_match_what_scikit_learn_accepts():
    """For every small class-size combination: check_split refuses exactly the splits that
    scikit-learn refuses (or, for k-fold, warns about), so its rule is neither looser nor stricter."""
    configs = [TrainConfig(data="folder", val_split=v) for v in (0.1, 0.2, 0.25, 0.34, 0.5, 0.7, 0.9)]
    configs += [TrainConfig(data="folder", folds=k) for k in (2, 3, 5)]
    checked = 0
    for classes in (2, 3):
        for counts in itertools.product(range(1, 7), repeat=classes):
            for cfg in configs:
                named = {f"class{i}": n for i, n in enumerate(counts)}
                try:
                    check_split(named, cfg, "data")
                    refused = False
                except MlexpError:
                    refused = True
                assert refused == sklearn_refuses(counts, cfg), (counts, cfg.val_split, cfg.folds)
                checked += 1
    assert checked > 2000


def test_too_few_images_for_folds_names_the_class_and_the_fixes(tmp_path):
    message = check(tmp_path, {"a": 6, "b": 6, "rare": 2, "rarer": 1}, folds=5)
    assert "class 'rarer' in" in message and "has 1 image(s), too few for --folds 5" in message
    assert "1 other class(es) have fewer than 5 too" in message
    assert "lower --folds" not in message  # one image allows no k-fold at all
    assert "add images to 'rarer', or pass --val-dir" in message


def test_val_split_too_small_to_hold_one_image_per_class(tmp_path):
    message = check(tmp_path, {"a": 3, "b": 3, "c": 3, "d": 3}, val_split=0.1)
    assert "--val-split 0.1 holds out 2 of 12 images" in message
    assert "fewer than its 4 classes" in message and "raise --val-split" in message


def test_val_split_leaving_fewer_training_images_than_classes(tmp_path):
    message = check(tmp_path, {"a": 2, "b": 2, "c": 2}, val_split=0.9)
    assert "--val-split 0.9 keeps 0 of 6 images" in message and "fewer than its 3 classes" in message


def test_built_in_data_is_checked_too_without_folder_advice():
    message = check(Path(), data="synthetic", folds=65)  # 64 images per class
    assert "--data synthetic" in message and "lower --folds to 64" in message
    assert "--val-dir" not in message and "add images" not in message
    message = check(Path(), data="digits", val_split=0.999)
    assert "--val-split 0.999 keeps 1 of 1797 images" in message and "fewer than its 10 classes" in message


def test_separate_val_dir_needs_no_split_but_the_same_non_empty_classes(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 1, "b": 1})
    val = make_folder(tmp_path / "val", {"a": 1, "b": 1})
    check_data_source(TrainConfig(data=str(train), val_dir=str(val)))  # no split: fine
    other = make_folder(tmp_path / "other", {"a": 1, "c": 1})
    assert "differ from training classes" in check(tmp_path, data=str(train), val_dir=str(other))
    (tmp_path / "val" / "empty").mkdir()
    (tmp_path / "train" / "empty").mkdir()
    message = check(tmp_path, data=str(train), val_dir=str(val))
    assert f"class folder {tmp_path / 'train' / 'empty'} holds no images" in message


def test_folds_never_silently_repeat_one_split(tmp_path):
    """k folds split one pool of images. With a separate validation folder every "fold" used to
    train and validate on the same two folders: identical runs that compare then counted as
    independent folds. That is refused; one pooled folder gives k distinct splits."""
    from mlexp.data.digests import content_digest
    from mlexp.data.sources import build_data

    pooled = make_folder(tmp_path / "pooled", {"a": 6, "b": 6})
    with_val = tmp_path / "with-val"
    make_folder(with_val / "train", {"a": 6, "b": 6})
    make_folder(with_val / "val", {"a": 2, "b": 2})
    for data, val_dir in ((with_val, None), (with_val / "train", with_val / "val")):
        options = {"data": str(data), "val_dir": str(val_dir) if val_dir else None, "folds": 3, "fold": 1}
        message = check(tmp_path, **options)
        assert "--folds 3 splits one pool of images" in message and "separate validation folder" in message
        # what training would have used: the same split for every fold
        splits = {content_digest(build_data(TrainConfig(**{**options, "fold": fold})).val_set)[0] for fold in range(3)}
        assert len(splits) == 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_mlexp(["sweep", "--backbones", "test_resnet", "--inits", "scratch", "--data", str(with_val),
                      "--folds", "3", "--img-size", "16"], subprocess_env(uri), tmp_path)
    one_line_error(done, "--folds 3 splits one pool of images")
    assert runs_in(tmp_path / "mlflow.db") == 0
    folds = [build_data(TrainConfig(data=str(pooled), folds=3, fold=fold)) for fold in range(3)]
    check_data_source(TrainConfig(data=str(pooled), folds=3, fold=2))
    assert len({content_digest(bundle.val_set)[0] for bundle in folds}) == 3
    assert len({content_digest(bundle.train_set)[0] for bundle in folds}) == 3


# --- 3: image size bound ---------------------------------------------------------------------


def test_img_size_upper_bound_is_validated_and_documented():
    assert TrainConfig(img_size=MAX_IMG_SIZE).img_size == MAX_IMG_SIZE
    with pytest.raises(MlexpError, match=f"--img-size must be at most {MAX_IMG_SIZE}, got {MAX_IMG_SIZE + 1}"):
        TrainConfig(img_size=MAX_IMG_SIZE + 1)
    with pytest.raises(MlexpError, match="at most"):
        TrainConfig.from_strings({"img_size": "2240"})
    help_text = TrainConfig.__dataclass_fields__["img_size"].metadata["help"]
    assert f"at most {MAX_IMG_SIZE}" in help_text


# --- 4: hidden folders and files -------------------------------------------------------------


def test_hidden_folders_are_never_classes_and_hidden_files_never_images(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 3, "dog": 3, ".ipynb_checkpoints": 4, ".git": 1})
    make_folder(root / "cat" / ".ipynb_checkpoints", {"nested": 2})  # cat/.ipynb_checkpoints/nested/*.png
    Image.new("RGB", (8, 8)).save(root / "dog" / ".hidden.png")
    Image.new("RGB", (8, 8)).save(root / "dog" / "._resource-fork.png")  # macOS copies leave these
    (root / ".DS_Store").write_bytes(b"\0")
    folder = CheckedImageFolder(root)
    assert folder.classes == ["cat", "dog"]
    names = sorted(str(Path(path).relative_to(root)) for path, _ in folder.samples)
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert class_image_counts(root) == {"cat": 3, "dog": 3}
    check_data_source(TrainConfig(data=str(root)))  # 2 real classes, split fine


def test_a_single_class_beside_a_hidden_folder_is_one_class(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 4, ".ipynb_checkpoints": 4})
    assert "has 1 class folder(s)" in check(tmp_path, data=str(root))


# --- 5: every image mode becomes 8-bit RGB by its real range -----------------------------------


def load(path: Path) -> np.ndarray:
    image = load_rgb_image(str(path))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 16, 3)
    return pixels


def test_16_bit_gradient_spans_0_to_255_not_all_white(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (4, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB")) == 255).mean() > 0.9  # PIL clips
    pixels = load(tmp_path / "g16.png")
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[0, -1].tolist() == [255, 255, 255]
    assert np.all(np.diff(pixels[0, :, 0].astype(int)) > 0)  # strictly increasing: no level lost
    assert np.abs(pixels[0, :, 0] - np.linspace(0, 255, 16)).max() <= 1


def test_12_bit_data_in_a_16_bit_file_keeps_its_contrast(tmp_path):
    gradient = np.tile(np.linspace(0, 4095, 16).round().astype(np.uint16), (4, 1))
    Image.fromarray(gradient).save(tmp_path / "g12.png")
    assert load(tmp_path / "g12.png")[0, :, 0].tolist() == np.linspace(0, 255, 16).round().astype(int).tolist()


def test_32_bit_integer_and_float_tiffs_use_their_own_range(tmp_path):
    ramp = np.tile(np.linspace(-1000, 3_000_000, 16), (4, 1))
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray((ramp / 3e6).astype(np.float32)).save(tmp_path / "f32.tif")
    for name, mode in (("i32.tif", "I"), ("f32.tif", "F")):
        assert Image.open(tmp_path / name).mode == mode
        row = load(tmp_path / name)[0, :, 0]
        assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) > 0), (name, row)
    constant = np.full((4, 16), 7.5, dtype=np.float32)
    Image.fromarray(constant).save(tmp_path / "flat.tif")
    assert load(tmp_path / "flat.tif").max() == 0  # no range, no contrast: never a division by zero


def test_grayscale_bilevel_cmyk_and_palette_load_as_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 17, dtype=np.uint8), (4, 1))  # 16 levels, 0..255
    Image.fromarray(gray).save(tmp_path / "l.png")
    assert np.array_equal(load(tmp_path / "l.png"), np.repeat(gray[..., None], 3, axis=2))
    Image.fromarray(gray > 127).save(tmp_path / "bw.png")
    assert Image.open(tmp_path / "bw.png").mode == "1"
    assert set(np.unique(load(tmp_path / "bw.png")).tolist()) == {0, 255}
    Image.new("CMYK", (16, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")  # pure red in CMYK
    assert load(tmp_path / "cmyk.tif")[0, 0].tolist() == [255, 0, 0]
    palette = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8), (4, 1)), mode="P")
    palette.putpalette([value for i in range(256) for value in (i * 16 % 256, 0, 0)])
    palette.save(tmp_path / "p.png")
    assert load(tmp_path / "p.png")[0, 3].tolist() == [48, 0, 0]


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = np.zeros((4, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (0, 128, 255, 255)  # opaque blue-ish left half
    rgba[:, 8:] = (0, 0, 0, 0)  # fully transparent right half, stored as black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    pixels = load(tmp_path / "rgba.png")
    assert pixels[0, 0].tolist() == [0, 128, 255] and pixels[0, -1].tolist() == [255, 255, 255]

    la = np.zeros((4, 16, 2), dtype=np.uint8)
    la[..., 0], la[:, :8, 1] = 40, 255  # grey 40: opaque left half, transparent right half
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    pixels = load(tmp_path / "la.png")
    assert pixels[0, 0].tolist() == [40, 40, 40] and pixels[0, -1].tolist() == [255, 255, 255]

    palette = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) % 2, (4, 1)), mode="P")
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.save(tmp_path / "pt.png", transparency=0)  # index 0 (black) is transparent
    assert Image.open(tmp_path / "pt.png").mode == "P"
    pixels = load(tmp_path / "pt.png")
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [200, 10, 10]


def test_image_folder_uses_the_loader(tmp_path):
    for name in ("dark", "bright"):
        (tmp_path / "data" / name).mkdir(parents=True)
        gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
        Image.fromarray(gradient).save(tmp_path / "data" / name / "0.png")
    image, label = CheckedImageFolder(tmp_path / "data")[0]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255 and label == 0


# --- 6 and 7: runs:/ and models:/ weights come from the run's store; downloads are cleaned ---


@pytest.fixture
def weights_store(tmp_path, monkeypatch):
    """A SQLite store holding one run with model/model.safetensors (a resnet18 state dict) and
    notes/readme.txt, a registered model with alias `champion`; the process works in an empty
    folder, with no MLFLOW_TRACKING_URI and its temporary files under tmp_path/tmp."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("weights", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    state = {"conv1.weight": torch.randn(64, 3, 7, 7)}  # locating reads the file, it does not load it
    upload = tmp_path / "upload"
    upload.mkdir()
    save_file(state, upload / "model.safetensors")
    (upload / "readme.txt").write_text("not weights")
    client.log_artifact(run_id, str(upload / "model.safetensors"), "model")
    client.log_artifact(run_id, str(upload / "readme.txt"), "notes")
    client.create_registered_model("digits-resnet")
    version = client.create_model_version("digits-resnet", source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("digits-resnet", "champion", version.version)
    for folder in ("cwd", "tmp"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return uri, run_id, file_sha256(upload / "model.safetensors")


def test_mlflow_weights_resolve_against_the_given_tracking_uri(tmp_path, weights_store):
    uri, run_id, sha = weights_store
    spec = resolve_backbone("resnet18")
    for weights, source in ((f"runs:/{run_id}/model/model.safetensors", "mlflow-run"),
                            (f"runs:/{run_id}/model", "mlflow-run"),
                            ("models:/digits-resnet/1", "mlflow-model"),
                            ("models:/digits-resnet@champion", "mlflow-model")):
        found = locate_weights(spec, weights, uri)
        assert (found.source, found.sha256, found.label) == (source, sha, weights)
        assert found.path.name == "model.safetensors" and found.path.is_relative_to(tmp_path / "tmp")
        del found
    assert list((tmp_path / "cwd").iterdir()) == []  # no ./mlflow.db, no ./mlruns


def test_download_folders_are_removed_when_done_and_on_failure(tmp_path, weights_store):
    uri, run_id, _ = weights_store
    spec = resolve_backbone("resnet18")
    found = locate_weights(spec, f"runs:/{run_id}/model", uri)
    assert found.path.is_file()  # usable by the caller (build_backbone) as long as it holds it
    download = found.path.parent
    del found
    gc.collect()
    assert not download.exists()
    with pytest.raises(MlexpError, match="no .safetensors or .pth file"):
        locate_weights(spec, f"runs:/{run_id}/notes", uri)
    with pytest.raises(MlexpError) as info:
        locate_weights(spec, "runs:/0123456789abcdef0123456789abcdef/model", uri)
    assert "could not download it from MLflow" in str(info.value) and uri in str(info.value)
    with pytest.raises(MlexpError, match="could not download"):
        locate_weights(spec, "models:/no-such-model@champion", uri)
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("mlexp-weights-")] == []
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_cli_weights_uri_uses_the_tracking_uri_option_and_fails_before_any_run(tmp_path):
    """`--tracking-uri` (no MLFLOW_TRACKING_URI) is where runs:/ is looked up: an unknown run is
    one line naming that store, no run is created there, and nothing appears in the cwd."""
    db = tmp_path / "given.db"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = subprocess_env("")
    env.pop("MLFLOW_TRACKING_URI")
    data = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    done = run_mlexp(["train", "--backbone", "resnet18", "--data", str(data), "--tracking-uri", f"sqlite:///{db}",
                      "--weights", "runs:/0123456789abcdef0123456789abcdef/model"], env, cwd=cwd, timeout=120)
    one_line_error(done, "--weights runs:/0123456789abcdef0123456789abcdef/model", "could not download",
                   f"sqlite:///{db}")
    assert runs_in(db) == 0
    assert list(cwd.iterdir()) == []


# --- the tracking store itself -----------------------------------------------------------------


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_a_deleted_experiment_says_how_to_restore_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("gone")
    client.delete_experiment(experiment_id)
    done = run_mlexp(["train", "--backbone", "resnet18_scratch", "--epochs", "1", "--experiment", "gone"],
                     subprocess_env(uri), cwd=tmp_path, timeout=120)
    one_line_error(done, "experiment 'gone' was deleted",
                   f"mlflow experiments restore --experiment-id {experiment_id}", "another --experiment")
    assert runs_in(tmp_path / "mlflow.db") == 0


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_a_tracking_store_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    done = run_mlexp(["train", "--backbone", "resnet18_scratch", "--epochs", "1", "--tracking-uri", uri],
                     subprocess_env(uri), cwd=tmp_path, timeout=120)
    one_line_error(done, "cannot create the MLflow tracking store", "--offline")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_over_bad_data_leaves_no_run_behind(tmp_path):
    data = make_folder(tmp_path / "data", {"cat": 5, "dog": 2})
    db = tmp_path / "mlflow.db"
    done = run_mlexp(["sweep", "--backbones", "resnet18_scratch", "--seeds", "1,2", "--data", str(data),
                      "--folds", "3", "--epochs", "1"], subprocess_env(f"sqlite:///{db}"), cwd=tmp_path, timeout=120)
    one_line_error(done, "class 'dog'", "--folds 3")
    assert runs_in(db) == 0


def test_symlink_loops_and_links_into_another_class_never_multiply_the_data(tmp_path, capsys):
    images, labels = digits_arrays()
    data = tmp_path / "data"
    for number, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for index, row in enumerate(np.flatnonzero(labels == number)[:5]):
            Image.fromarray(images[row]).save(data / name / f"{index}.png")
    (data / "a" / "loop").symlink_to(data / "a", target_is_directory=True)  # a/loop/loop/loop/...
    (data / "a" / "up").symlink_to(data, target_is_directory=True)  # a/up/b/*.png: class b's images
    (data / "b" / "from_a.png").symlink_to(data / "a" / "0.png")  # would relabel an image of a
    (data / "a" / "again.png").symlink_to(data / "a" / "1.png")  # one real file, two names

    assert class_image_counts(data) == {"a": 5, "b": 5}
    warning = capsys.readouterr().out
    assert "6 image(s)" in warning and "links into another class's folder" in warning  # b's 5 via a/up, from_a
    folder = CheckedImageFolder(data)
    assert len(folder.samples) == 10 and sorted(folder.targets) == [0] * 5 + [1] * 5
    assert len({os.path.realpath(path) for path, _ in folder.samples}) == 10
    data_set = build_data(TrainConfig(data=str(data), val_split=0.4, img_size=16))
    assert len(data_set.train_set) + len(data_set.val_set) == 10
