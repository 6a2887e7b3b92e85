"""`compare --pair`: any two arms of a study, compared head to head.

An arm is a set of KEY=VALUE conditions on the runs, the keys named as --group-by names them
(init, strategy, backbone, arch, dataset, lr, epochs, any param, tags.X, params.X). A pair is
two arms, written `A vs B` (or `A B`, two words):

    --pair 'init=pretrained,strategy=linear vs init=scratch,strategy=full'

One string per pair, so that it is also one `mlflow run -P pair=...` parameter; `;` separates
several pairs in one string (an MLproject parameter is a single value), and the option may be
repeated. A run belongs to an arm when it meets every condition of it; `backbone=resnet18`
also matches the architecture (both resnet18_pretrained and resnet18_scratch), as a user
naming an arm by its architecture means. Numbers compare as numbers (lr=1e-3 is lr=0.001).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mlexp.errors import MlexpError

PAIRS_SEPARATOR = ";"
ARMS_SEPARATOR = "vs"
# Keys that name what a run's architecture is: an arm that sets one compares architectures,
# so its pairs are not also matched on the architecture.
ARCH_KEYS = ("arch", "backbone", "tags.mlexp.backbone", "params.backbone")
STRATEGY_WORDS = {"linear": "linear probe", "full": "full training", "gradual": "gradual unfreezing"}
EXAMPLE = "--pair 'init=pretrained,strategy=linear vs init=scratch,strategy=full'"

Field = Callable[[object, str], "str | None"]  # (run record, key) -> its value: compare.field_value


@dataclass(frozen=True)
class Arm:
    """One side of a pair: conditions every one of its runs meets."""

    conditions: tuple[tuple[str, str], ...]

    @property
    def spec(self) -> str:
        """As the user wrote it (normalised): init=pretrained,strategy=linear."""
        return ",".join(f"{key}={value}" for key, value in self.conditions)

    @property
    def names_arch(self) -> bool:
        return any(key in ARCH_KEYS for key, _ in self.conditions)

    def describe(self) -> str:
        """In words, for report.md: "frozen pretrained (linear probe)", "scratch (full training)"."""
        said = dict(self.conditions)
        strategy = said.pop("strategy", None)
        words = [said.pop("init")] if "init" in said else []
        words += [said.pop(key) for key in ("backbone", "arch") if key in said]
        words += [f"{key}={value}" for key, value in said.items()]
        if strategy == "linear":
            words.insert(0, "frozen")  # a linear probe trains the head on frozen features
        text = " ".join(words)
        if strategy:
            what = STRATEGY_WORDS.get(strategy, f"strategy {strategy}")
            text = f"{text} ({what})" if text else what
        return text

    def holds_for(self, run, field: Field) -> bool:
        return all(meets(run, key, value, field) for key, value in self.conditions)


@dataclass(frozen=True)
class ArmPair:
    a: Arm
    b: Arm

    @property
    def label(self) -> str:
        return f"{self.a.spec} vs {self.b.spec}"

    @property
    def match_arch(self) -> bool:
        """Pairs share the architecture unless an arm names it (then it is what is compared)."""
        return not (self.a.names_arch or self.b.names_arch)

    def side(self, run, field: Field) -> str | None:
        """The arm's spec a run belongs to, "both" (it cannot count for either), or None."""
        in_a, in_b = self.a.holds_for(run, field), self.b.holds_for(run, field)
        if in_a and in_b:
            return "both"
        return self.a.spec if in_a else self.b.spec if in_b else None

    def describe(self) -> str:
        return f"{self.a.describe()} vs {self.b.describe()}"


def parse_pairs(values: Iterable[str]) -> list[ArmPair]:
    """--pair values -> pairs (a malformed one is a one-line MlexpError)."""
    pairs = []
    for value in values:
        for text in str(value).split(PAIRS_SEPARATOR):
            if text.strip():
                pairs.append(parse_pair(text.strip()))
    return pairs


def parse_pair(text: str) -> ArmPair:
    words = text.split()
    if len(words) == 3 and words[1] == ARMS_SEPARATOR:
        words = [words[0], words[2]]
    if len(words) != 2:
        raise MlexpError(f"--pair {text!r}: expected two arms, 'A vs B', each KEY=VALUE[,KEY=VALUE...] without "
                         f"spaces, e.g. {EXAMPLE}")
    pair = ArmPair(parse_arm(words[0], text), parse_arm(words[1], text))
    if pair.a == pair.b:
        raise MlexpError(f"--pair {text!r}: both arms are {pair.a.spec}; the arms must differ")
    return pair


def parse_arm(arm: str, text: str) -> Arm:
    conditions: dict[str, str] = {}
    for item in arm.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MlexpError(f"--pair {text!r}: {item!r} is not KEY=VALUE (e.g. init=pretrained); {EXAMPLE}")
        if key.strip() in conditions:
            raise MlexpError(f"--pair {text!r}: {key.strip()!r} is set twice in the arm {arm!r}")
        conditions[key.strip()] = value.strip()
    return Arm(tuple(conditions.items()))


def meets(run, key: str, wanted: str, field: Field) -> bool:
    found = [field(run, key)] + ([field(run, "arch")] if key == "backbone" else [])
    return any(same_value(value, wanted) for value in found if value is not None)


def same_value(found: str, wanted: str) -> bool:
    if str(found) == wanted:
        return True
    try:
        return float(found) == float(wanted)
    except ValueError:
        return False


def check_keys(pairs: list[ArmPair], runs: list, field: Field) -> None:
    """A key that is neither a tag nor a param of any compared run is a typo: say so, once."""
    if not runs:
        return
    for pair in pairs:
        for key, _ in (*pair.a.conditions, *pair.b.conditions):
            if not any(field(run, key) is not None for run in runs):
                params = sorted({name for run in runs for name in run.params})
                raise MlexpError(f"--pair {pair.label!r}: {key!r} is neither a tag nor a param of the compared runs; "
                                 f"try init, strategy, backbone, arch, dataset or a param: {', '.join(params[:25])}")
