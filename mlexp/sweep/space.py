"""A tuning study's search space, declared once on the command line:

    --space 'lr=1e-5:1e-1:log,weight_decay=0:0.1,warmup_epochs=0:5:int,label_smoothing=0,0.1'

Each NAME is a training option (`mlexp train --help`). `LOW:HIGH` is a range (floats; `:int`
for whole numbers, `:log` to sample on a log scale, `:int:log` both); a list of values
(`0,0.1` or `adamw,sgd`) is a choice among them. The ranges become Optuna's distributions.
"""

# Imported where used: `optuna`, because `mlexp tune --help` and its option checks import
# this module.
from __future__ import annotations

import typing
from dataclasses import dataclass, fields

from mlexp.config import TrainConfig, base_type, cli_name, parse_value
from mlexp.errors import MlexpError

# What a study may not tune: what makes an arm an arm, what a run is, and how it is tracked.
NOT_TUNABLE = {"backbone", "init", "strategy", "seed", "data", "task", "epochs", "fold", "folds", "resume",
               "resume_from", "run_name", "experiment", "tracking_uri", "offline", "dry_run", "plugins",
               "weights", "weights_from", "splits", "test_dir", "log_dir", "best_metric", "best_mode"}


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str  # "float", "int" or "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def grid_values(self) -> list:
        """The values a grid search tries: the choices, or every whole number of an int range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1))
        raise MlexpError(f"--sampler grid needs listed values for {self.name} (e.g. {self.name}=0.001,0.01,0.1), "
                         f"not a {'log ' if self.log else ''}range")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]" + (" (int)" if self.kind == "int" else "") \
            + (" (log)" if self.log else "")


def parse_space(text: str) -> list[Dimension]:
    """The dimensions `--space` declares; one clear MlexpError for each way it can be wrong."""
    entries: list[tuple[str, list[str]]] = []
    for token in (part.strip() for part in text.split(",")):
        if "=" in token:
            name, _, value = token.partition("=")
            entries.append((name.strip(), [value.strip()]))
        elif entries and token:
            entries[-1][1].append(token)  # another value of the choice before it
        elif token:
            raise MlexpError(f"--space: {token!r} names no option; write NAME=LOW:HIGH or NAME=A,B,...")
    if not entries:
        raise MlexpError("--space is empty: name at least one option, e.g. --space 'lr=1e-4:1e-1:log'")
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise MlexpError(f"--space names {sorted({n for n in names if names.count(n) > 1})[0]} twice")
    return [dimension(name, values) for name, values in entries]


def dimension(name: str, values: list[str]) -> Dimension:
    hints = typing.get_type_hints(TrainConfig)
    annotations = {f.name: base_type(hints[f.name]) for f in fields(TrainConfig)}
    kinds = {field_name: {float: "float", int: "int"}.get(kind, "other") for field_name, kind in annotations.items()}
    key = name.replace("-", "_")
    if key not in kinds or key in NOT_TUNABLE:
        tunable = sorted(n for n, kind in kinds.items() if n not in NOT_TUNABLE and kind != "other")
        raise MlexpError(f"--space: {name!r} is not a training option a study can tune; numeric ones are "
                         f"{', '.join(tunable)} (and any option as a list of values)")
    if len(values) == 1 and ":" in values[0]:
        return value_range(key, kinds[key], values[0])
    # each listed value parsed as the option parses it (true/false, numbers, words)
    return Dimension(key, "choice", choices=tuple(parse_value(key, annotations[key], value) for value in values))


def value_range(name: str, kind: str, text: str) -> Dimension:
    low_text, high_text, *flags = text.split(":")
    unknown = [flag for flag in flags if flag not in ("log", "int")]
    if unknown:
        raise MlexpError(f"--space {name}={text}: {unknown[0]!r} is neither log nor int")
    if kind not in ("float", "int"):
        raise MlexpError(f"--space {name}: --{cli_name(name)} is not a number; list its values (A,B,...)")
    integer = "int" in flags or kind == "int"
    low, high = typed(name, "float", low_text), typed(name, "float", high_text)
    if low > high:
        raise MlexpError(f"--space {name}={text}: the low end {low:g} is above the high end {high:g}")
    if "log" in flags and low <= 0:
        raise MlexpError(f"--space {name}={text}: a log range must stay above 0 (it starts at {low:g})")
    if integer and (low != int(low) or high != int(high)):
        raise MlexpError(f"--space {name}={text}: an int range needs whole ends")
    if kind == "int" and not integer:
        integer = True
    return Dimension(name, "int" if integer else "float", low, high, "log" in flags)


def typed(name: str, kind: str, text: str):
    try:
        return {"float": float, "int": int}.get(kind, str)(text)
    except ValueError:
        raise MlexpError(f"--space {name}: {text!r} is not a{'n integer' if kind == 'int' else ' number'}") from None
