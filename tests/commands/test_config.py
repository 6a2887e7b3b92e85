"""One option set: config fields, CLI options and MLproject parameters are the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from entrypoints.mlproject import ENTRY_POINTS, NOT_PARAMETERS, render
from mlexp.commands.cli import PRETRAIN_DEFAULTS, cli
from mlexp.config import TrainConfig, config_fields
from mlexp.errors import MlexpError
from mlexp.training.recipes import preset_fields

ROOT = Path(__file__).resolve().parents[2]


def test_mlproject_file_is_generated_from_the_cli():
    assert (ROOT / "MLproject").read_text() == render(), "run `make mlproject` to regenerate MLproject"


@pytest.mark.parametrize("entry_point", ["main", "train"])
def test_train_parameters_cli_options_and_config_fields_are_one_set(entry_point):
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    mlproject_params = set(project["entry_points"][entry_point]["parameters"])
    cli_options = {p.name for p in cli.commands["train"].params if not getattr(p, "hidden", False)}
    cli_options -= set(NOT_PARAMETERS)  # --run-id: under `mlflow run` the run is MLflow's
    fields = {f.name for f in config_fields()}
    assert mlproject_params == cli_options == fields
    command = project["entry_points"][entry_point]["command"]
    for name in fields:  # every parameter reaches the CLI
        assert f"--{name.replace('_', '-')} {{{name}}}" in command


@pytest.mark.parametrize("entry_point, own", [("train", {}), ("pretrain", PRETRAIN_DEFAULTS)])
def test_mlproject_defaults_are_each_entry_points_own(entry_point, own):
    """The command's own defaults; "" (not set) where a --recipe preset may set the value, so
    a -P value always wins over the recipe; else the config field's default."""
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    params = project["entry_points"][entry_point]["parameters"]
    for f in config_fields():
        if f.name in own:
            expected = own[f.name]
        elif f.name in preset_fields():
            expected = ""
        else:
            expected = "" if f.default is None else str(f.default)
        assert params[f.name]["default"] == expected, f.name
    assert {"lr", "optimizer", "ema", "weight_decay"} <= preset_fields()


def test_from_strings_parses_types_and_treats_empty_as_unset():
    cfg = TrainConfig.from_strings({"epochs": "5", "lr": "0.01", "ema": "true", "weights": "", "run_name": "x"})
    assert (cfg.epochs, cfg.lr, cfg.ema, cfg.weights, cfg.run_name) == (5, 0.01, True, None, "x")
    assert TrainConfig.from_strings({"ema": "False"}).ema is False


@pytest.mark.parametrize("values, message", [
    ({"epochs": "0"}, "--epochs must be positive"),
    ({"lr": "-1"}, "--lr must be positive"),
    ({"batch_size": "0"}, "--batch-size must be positive"),
    ({"epochs": "three"}, "--epochs must be a whole number"),
    ({"val_split": "1.5"}, "--val-split must be between 0 and 1"),
    ({"val_split": "0"}, "--val-split must be between 0 and 1"),
    ({"optimizer": "lamb"}, "--optimizer must be one of adamw, sgd"),
    ({"scheduler": "poly"}, "--scheduler must be one of"),
    ({"mixed_precision": "fp8"}, "--mixed-precision must be one of"),
    ({"folds": "5", "fold": "5"}, "--fold must be in 0..4"),
    ({"ema": "maybe"}, "--ema must be true or false"),
    ({"color_jitter": "1,2"}, "--color-jitter must be one strength .* or brightness,contrast,saturation"),
    ({"color_jitter": "0.4,0.4,0.4,0.6"}, "hue at most 0.5, got '0.4,0.4,0.4,0.6'"),
    ({"color_jitter": "-0.1"}, "each at least 0"),
    ({"color_jitter": "strong"}, "--color-jitter must be"),
    ({"rotate": "-5"}, r"--rotate must be in \[0, 180\] degrees"),
    ({"rotate": "270"}, r"--rotate must be in \[0, 180\] degrees"),
])
def test_bad_values_raise_one_clear_error(values, message):
    with pytest.raises(MlexpError, match=message):
        TrainConfig.from_strings(values)


def test_color_jitter_is_one_number_as_before_or_four_with_hue_and_survives_every_round_trip():
    assert TrainConfig.from_strings({"color_jitter": "0.4"}).color_jitter == 0.4  # a float, as runs recorded it
    assert isinstance(TrainConfig.from_strings({"color_jitter": "0.4"}).color_jitter, float)
    assert TrainConfig.from_strings({"color_jitter": ""}).color_jitter is None  # MLproject's "": the default
    spellings = {"0.4,0.4,0.4": 0.4, "0.4, 0.4, 0.4, 0": 0.4, "0.4,0.4,0.4,0.1": "0.4,0.4,0.4,0.1",
                 "1,0.5,0,0.5": "1.0,0.5,0.0,0.5", " 0 ": 0.0}
    for typed, stored in spellings.items():  # one spelling per jitter: equal jitters hash alike
        cfg = TrainConfig.from_strings({"color_jitter": typed, "rotate": "12.5"})
        assert cfg.color_jitter == stored and cfg.rotate == 12.5
        assert TrainConfig.from_strings(cfg.to_params()) == cfg  # MLflow params, `mlflow run -P`
        assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg  # config.json


def test_params_are_every_field_flat():
    params = TrainConfig().to_params()
    assert set(params) == {f.name for f in config_fields()}
    assert all(isinstance(v, str) for v in params.values())


def test_every_entry_point_passes_exactly_its_commands_options():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    for entry, spec in project["entry_points"].items():
        module, command_name, _ = ENTRY_POINTS[entry]
        assert spec["command"].startswith(f"python -m entrypoints.{module} ")
        assert (ROOT / "entrypoints" / f"{module}.py").is_file()
        options = {p.name for p in cli.commands[command_name].params if not getattr(p, "hidden", False)}
        assert set(spec["parameters"]) == options - set(NOT_PARAMETERS), entry
