"""Bad input: one line on stderr, exit status 2, no traceback, no MLflow run left RUNNING."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from mlexp.commands.cli import main
from tests.helpers import run_mlexp, subprocess_env


def make_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    return done.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mlexp: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def no_run_left_running(uri: str) -> bool:
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    return all(run.info.status != "RUNNING" for run in runs)


TRAIN = ["train", "--img-size", "16", "--batch-size", "4", "--epochs", "1"]


@pytest.mark.parametrize("args, fragments", [
    (["--backbone", "resnt18_scratch"], ["resnet18_scratch"]),
    (["--data", "/nonexistent/folder"], ["/nonexistent/folder", "does not exist"]),
    (["--epochs", "0"], ["--epochs must be positive"]),
    (["--lr", "-0.1"], ["--lr must be positive"]),
    (["--batch-size", "0"], ["--batch-size must be positive"]),
    (["--val-split", "1.5"], ["--val-split"]),
    (["--color-jitter", "0.4,0.4,0.4,0.9"], ["--color-jitter must be one strength", "hue at most 0.5"]),
    (["--rotate", "-5"], ["--rotate must be in [0, 180] degrees"]),
    (["--epochs", "many"], ["--epochs must be a whole number"]),
    (["--epoch", "3"], ["no such option --epoch; did you mean --epochs?"]),
    (["--lrr", "3"], ["no such option --lrr; did you mean --lr?"]),  # only near misses, not --reprob
    (["--tracking-uri", "http://127.0.0.1:9"], ["cannot reach the MLflow tracking server"]),
    (["--resume", "0123456789abcdef0123456789abcdef"], ["cannot resume", "0123456789abcdef"]),
    (["--fold", "1-3"], ["--fold 1-3 names several folds", "mlexp sweep --folds 1-3"]),
    (["--splits", "splits.csv"], ["--splits lists image files; pass the folder they are under as --data"]),
    (["--data", "torchvision:Imagenette:/tmp"], ["mlexp reads these torchvision datasets: DTD"]),
    (["--data", "torchvision:CIFAR10"], ["name the local folder too, torchvision:CIFAR10:ROOT"]),
    (["--resume-from", "best"], ["--resume-from best needs --resume RUN_ID"]),
    (["--best-metric", "val/auc"], ["--best-metric must be one of val/acc"]),
])
def test_bad_options_give_one_line_and_exit_2(args, fragments, sqlite_uri, capsys):
    code, err = run_cli(TRAIN + ["--backbone", "resnet18_scratch", *args], capsys)
    assert_one_line_error(code, err, *fragments)
    assert no_run_left_running(sqlite_uri)


@pytest.mark.parametrize("module, args, fragments", [
    ("import not_installed_anywhere\n", ["--backbone", "badmodels:net"],
     ["cannot import module 'badmodels' (ModuleNotFoundError", "current folder"]),
    ("def net(classes=10):\n    pass\n", ["--backbone", "badmodels:net"], ["net() must take num_classes"]),
    ("def resnet18(num_classes=10):\n    pass\n", ["--backbone", "badmodels:resnet18"],
     ["'resnet18' is also a timm model"]),
    ("", ["--plugins", "no_such_plugin", "--backbone", "test_resnet"], ["--plugins no_such_plugin: cannot import"]),
    ("", ["--weights-key-map", "encoder."], ["expected OLD=NEW"]),
    ("", ["--unfreeze-patterns", "fc;layer4["], ["not a regular expression"]),
    ("def net(num_classes=10, **kwargs):\n    pass\n", ["--backbone", "badmodels:net", "--init", "pretrained"],
     ["no pretrained weights for net", "net.safetensors, net.pt, net.pth, net_*.safetensors"]),
])
def test_bad_models_of_ones_own_give_one_line_and_exit_2(module, args, fragments, sqlite_uri, tmp_path, capsys,
                                                        monkeypatch):
    (tmp_path / "badmodels.py").write_text(module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "badmodels", raising=False)  # each case its own module
    code, err = run_cli([*TRAIN, "--init", "scratch", *args], capsys)
    assert_one_line_error(code, err, *fragments)
    assert no_run_left_running(sqlite_uri)


def test_mistyped_command_suggests_the_command(capsys):
    code, err = run_cli(["trian"], capsys)
    assert_one_line_error(code, err, "no command 'trian'; did you mean train?", "(see `mlexp --help`)")


def test_empty_and_single_class_folders(sqlite_uri, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    code, err = run_cli(TRAIN + ["--backbone", "resnet18_scratch", "--data", str(empty)], capsys)
    assert_one_line_error(code, err, "holds no images")
    single = make_image_folder(tmp_path / "single", classes=1)
    code, err = run_cli(TRAIN + ["--backbone", "resnet18_scratch", "--data", str(single)], capsys)
    assert_one_line_error(code, err, "at least 2")
    a_file = tmp_path / "images.zip"
    a_file.write_bytes(b"PK")
    code, err = run_cli(TRAIN + ["--backbone", "resnet18_scratch", "--data", str(a_file)], capsys)
    assert_one_line_error(code, err, "is not a folder")
    code, err = run_cli(["sweep", "--backbones", "resnet18", "--data", str(empty)], capsys)
    assert_one_line_error(code, err, "holds no images")
    # errors found before training leave no run at all, not even a FAILED one
    client = MlflowClient(sqlite_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height (a decompression bomb's first 33 bytes)."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(
        ">I", zlib.crc32(b"IHDR" + header))


@pytest.mark.parametrize("name, content", [("broken.png", b"this is not a png"),
                                           ("bomb.png", png_header(60000, 60000))])
def test_unreadable_image_fails_the_run_cleanly(sqlite_uri, tmp_path, capsys, name, content):
    folder = make_image_folder(tmp_path / "imgs")
    (folder / "class0" / name).write_bytes(content)
    code, err = run_cli(TRAIN + ["--backbone", "resnet18_scratch", "--data", str(folder), "--val-split", "0.3"],
                        capsys)
    assert_one_line_error(code, err, "cannot read image", name)
    client = MlflowClient(sqlite_uri)
    [run] = client.search_runs([client.get_experiment_by_name("mlexp").experiment_id])
    assert run.info.status == "FAILED" and name in run.data.tags["mlexp.error"]


def test_console_script_error_has_no_traceback(tmp_path):
    """The real console entry point in a subprocess, as a user's shell runs it."""
    done = run_mlexp(["train", "--backbone", "resnt50_scratch"], subprocess_env(f"sqlite:///{tmp_path}/m.db"),
                     tmp_path)
    assert_one_line_error(done.returncode, done.stderr, "resnet50_scratch")


def test_compare_errors_are_one_line(sqlite_uri, capsys):
    MlflowClient(sqlite_uri).create_experiment("exists")
    capsys.readouterr()  # MLflow's own notice of the store it created here, before any mlexp command ran
    code, err = run_cli(["compare", "--experiment", "does-not-exist"], capsys)
    assert_one_line_error(code, err, "does-not-exist")
    code, err = run_cli(["compare", "--experiment", "exists", "--filter", "params.lr >>> 3"], capsys)
    assert_one_line_error(code, err, "filter")


def test_an_experiment_named_with_commas_is_addressed_as_a_json_list(sqlite_uri, capsys):
    client = MlflowClient(sqlite_uri)
    run = client.create_run(client.create_experiment("lr=0.1, wd=0.05"))
    client.log_metric(run.info.run_id, "val/acc", 0.5)
    client.set_terminated(run.info.run_id)
    capsys.readouterr()  # MLflow's own lines from creating the store
    code, err = run_cli(["monitor", "--summary", "--experiment", "lr=0.1, wd=0.05"], capsys)
    assert_one_line_error(code, err, "no MLflow experiment 'lr=0.1'", """--experiment '["lr=0.1, wd=0.05"]'""")
    main(["monitor", "--summary", "--experiment", '["lr=0.1, wd=0.05"]'])
    assert run.info.run_id[:8] in capsys.readouterr().out
