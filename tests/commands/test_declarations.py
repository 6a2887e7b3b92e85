"""Every command's own options come from one declaration: the CLI's options, their help and
defaults, and the parsed values are all the declaration's."""

from __future__ import annotations

import dataclasses

import pytest

from mlexp.commands.cli import cli
from mlexp.commands.declarations import BY_COMMAND, CompareOptions, SweepOptions
from mlexp.commands.options import default_text, parse_options
from mlexp.config import DEFAULT_EXPERIMENT, config_fields
from mlexp.errors import MlexpError


@pytest.mark.parametrize("command", sorted(BY_COMMAND))
def test_a_command_s_options_are_its_declaration_s(command):
    declaration = BY_COMMAND[command]
    options = {param.name: param for param in cli.commands[command].params if param.name != "help"}
    declared = {f.name: f for f in dataclasses.fields(declaration)}
    # the sweep and tune also take every training option, except those they declare themselves
    training = {f.name for f in config_fields()} - set(declared) if command in ("sweep", "tune") else set()
    assert set(options) - training == set(declared)
    for name, f in declared.items():
        shown = f"(default: {default_text(f)})"
        assert (shown in options[name].help) == (f.default not in (None, ())), (command, name)


@pytest.mark.parametrize("command", sorted(BY_COMMAND))
def test_nothing_given_and_everything_empty_both_mean_the_defaults(command):
    declaration = BY_COMMAND[command]
    defaults = declaration()
    assert parse_options(declaration, {}) == defaults
    empty = {f.name: ("",) if f.metadata.get("repeatable") else "" for f in dataclasses.fields(declaration)}
    assert parse_options(declaration, empty) == defaults


def test_values_are_parsed_into_their_types():
    parsed = parse_options(SweepOptions, {"backbones": "resnet18, resnet50", "seeds": "1,2", "parallel": "2",
                                          "retry_failed": "yes", "executor": "ray"})
    assert parsed.backbones == ("resnet18", "resnet50") and parsed.seeds == ("1", "2")
    assert parsed.parallel == 2 and parsed.retry_failed is True and parsed.executor == "ray"
    repeated = parse_options(CompareOptions, {"experiment": ("a,b", "c"), "log_run": "false"})
    assert repeated.experiment == ("a", "b", "c") and repeated.log_run is False
    assert CompareOptions().experiment == (DEFAULT_EXPERIMENT,)


@pytest.mark.parametrize("values, message", [({"parallel": "two"}, "--parallel must be a whole number"),
                                             ({"executor": "slurm"}, "--executor must be local or ray"),
                                             ({"retry_failed": "maybe"}, "--retry-failed must be true or false")])
def test_bad_values_are_one_clear_error(values, message):
    with pytest.raises(MlexpError, match=message):
        parse_options(SweepOptions, values)


def test_a_name_with_commas_is_addressed_as_a_json_list():
    parsed = parse_options(CompareOptions, {"experiment": ('["lr=0.1, wd=0.05", "plain"]', "other")})
    assert parsed.experiment == ("lr=0.1, wd=0.05", "plain", "other")
    assert parse_options(CompareOptions, {"experiment": "a,b"}).experiment == ("a", "b")  # commas still separate
    with pytest.raises(MlexpError, match="starts like a JSON list of names but is not one"):
        parse_options(CompareOptions, {"experiment": '["unclosed'})
