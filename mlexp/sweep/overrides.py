"""A sweep's per-strategy and per-init epochs and learning rates.

A linear probe converges in far fewer epochs than full fine-tuning, and wants a larger learning
rate; one --epochs and one --lr for every arm of a grid makes one of them badly tuned. So:

- `--strategy-epochs linear=15,full=30`, `--strategy-lr linear=0.01,full=0.001`: the value a
  strategy's runs are asked for, in place of --epochs / --lr. Scratch runs still get the
  scratch multipliers on top (`training.recipes.apply_init_adjustments`), as they would on --epochs.
- `--init-epochs scratch=20`, `--init-lr scratch=0.002`: the value that init's runs train
  with. For scratch the multiplier is set to 1 (--scratch-epochs-mult 1, --scratch-lr-mult 1),
  so the effective value, which the plan prints and the run logs, is what the user wrote. An
  init's value wins over a strategy's: it is the one the run trains with.

Each row of the plan gets these as its requested config and as its child's `mlexp train` options,
so the plan, the config hash and the children's logged params all hold the effective values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlexp.config import parse_value
from mlexp.errors import MlexpError

# option -> (the TrainConfig field it sets, its type, the scratch multiplier an init value neutralises)
OPTIONS = {"strategy_epochs": ("epochs", int, None), "strategy_lr": ("lr", float, None),
           "init_epochs": ("epochs", int, "scratch_epochs_mult"), "init_lr": ("lr", float, "scratch_lr_mult")}


@dataclass(frozen=True)
class Overrides:
    """Parsed override options: option -> {strategy or init name -> value}, and their text."""

    values: dict[str, dict[str, int | float]] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)  # option -> as given, for the sweep parent's params

    @classmethod
    def parse(cls, given: dict[str, tuple[str, ...]], strategies: list[str], inits: tuple[str, ...]) -> Overrides:
        """`given`: option -> its NAME=VALUE items. A name that is not one of the sweep's
        strategies (or not an init), a bad number, a name twice: a one-line MlexpError."""
        values, specs = {}, {}
        for option, items in given.items():
            if option not in OPTIONS:
                raise ValueError(f"not an override option: {option}")
            names = tuple(strategies) if option.startswith("strategy") else tuple(inits)
            values[option] = parse_items(option, items, names)
            if items:
                specs[option] = ",".join(items)
        return cls(values, specs)

    def changes(self, strategy: str, init: str) -> dict[str, int | float]:
        """The config fields a (strategy, init) row's overrides set (init ones last: they win)."""
        changed: dict[str, int | float] = {}
        for option, (name, _, multiplier) in OPTIONS.items():
            key = strategy if option.startswith("strategy") else init
            if key in self.values.get(option, {}):
                changed[name] = self.values[option][key]
                if multiplier and init == "scratch":
                    changed[multiplier] = 1.0  # the written value is the effective one
        return changed


def parse_items(option: str, items: tuple[str, ...], names: tuple[str, ...]) -> dict[str, int | float]:
    flag = "--" + option.replace("_", "-")
    _, kind, _ = OPTIONS[option]
    parsed: dict[str, int | float] = {}
    for item in items:
        name, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not name or not raw:
            raise MlexpError(f"{flag} {item!r}: expected NAME=VALUE, e.g. {flag} {names[0]}="
                             f"{'20' if kind is int else '0.001'}")
        if name not in names:
            what = "strategies (--strategies)" if option.startswith("strategy") else "inits"
            raise MlexpError(f"{flag} {item!r}: {name!r} is not one of the sweep's {what}: {', '.join(names)}")
        if name in parsed:
            raise MlexpError(f"{flag}: {name} is given twice")
        try:
            value = parse_value(option, kind, raw)
        except MlexpError:
            raise MlexpError(f"{flag} {item!r}: {raw!r} is not {'a whole number' if kind is int else 'a number'}") \
                from None
        if not value > 0:
            raise MlexpError(f"{flag} {item!r}: the value must be positive")
        parsed[name] = value
    return parsed
