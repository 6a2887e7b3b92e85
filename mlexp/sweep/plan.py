"""A sweep's plan: the grid (backbones x inits x strategies x seeds x folds) as numbered rows.

The whole grid is planned before anything starts: a backbone name that does not exist is a
user error (one line naming the closest names), not a sweep of FAILED runs. Each row holds
what the user asked for, its effective config (after the init adjustments), the hash of
that config (what makes two runs the same configuration) and the `mlexp train` options its
child process runs with: the sweep's own training options plus the row's axes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mlexp.config import TrainConfig, cli_name, config_hash, parse_value
from mlexp.data.partitions import is_fold_list, parse_folds
from mlexp.errors import MlexpError
from mlexp.models.catalogue import CATALOGUE, BackboneSpec, resolve_backbone
from mlexp.sweep.overrides import Overrides
from mlexp.training.recipes import apply_init_adjustments, format_init_comparison

INITS = ("pretrained", "scratch")


@dataclass
class PlanRow:
    """One configuration of the grid: what the user asked for and its effective config."""

    index: int
    requested: TrainConfig
    spec: BackboneSpec
    effective: TrainConfig
    config_hash: str
    overridden: dict[str, str] = field(default_factory=dict)  # the row's per-strategy/init values, as options

    def train_args(self, options: dict[str, str]) -> list[str]:
        """The `mlexp train` options of this row's child: the sweep's training options as the
        user gave them (so the child builds its config exactly as a single run would), then
        the row's per-strategy and per-init values, its axes and its run name."""
        cfg = self.requested
        axes = {"backbone": cfg.backbone, "init": cfg.init, "strategy": cfg.strategy, "seed": str(cfg.seed),
                "folds": str(cfg.folds), "fold": str(cfg.fold), "run_name": self.run_name}
        args: list[str] = []
        for name, value in {**options, **self.overridden, **axes}.items():
            args += [f"--{cli_name(name)}", str(value)]
        return args

    @property
    def label(self) -> str:
        cfg = self.effective
        fold = f" fold {cfg.fold}" if cfg.folds or cfg.fold else ""
        return f"{display_name(cfg.backbone, cfg.init)} {cfg.strategy} seed {cfg.seed}{fold}"

    @property
    def run_name(self) -> str:
        """Short, so the MLflow UI does not cut off seed and fold: resnet18_scratch-full-s42-f1."""
        cfg = self.effective
        fold = f"-f{cfg.fold}" if cfg.folds or cfg.fold else ""
        return f"{display_name(cfg.backbone, cfg.init)}-{cfg.strategy}-s{cfg.seed}{fold}"


def display_name(backbone: str, init: str) -> str:
    """The name the sweep summary and `mlexp compare` show: the catalogue name (resnet18_scratch),
    or a timm model name or a model of the user's own with its init (convnext_tiny_scratch,
    twistnet18_pretrained for mymodels:twistnet18)."""
    backbone = backbone.rpartition(":")[2]
    return backbone if backbone in CATALOGUE or backbone.endswith(f"_{init}") else f"{backbone}_{init}"


def expand_grid(base: TrainConfig, backbones: list[str], inits: list[str], strategies: list[str],
                seeds: list[int], folds: list[int], overrides: Overrides | None = None) -> list[PlanRow]:
    """The numbered plan. A backbone named with its init (`resnet50_scratch`) keeps that init;
    one without a pretrained flavour (vit_small) is planned for scratch only. `overrides`: the
    per-strategy and per-init epochs and lr (`sweep.overrides`), part of each row's request."""
    rows: list[PlanRow] = []
    overrides = overrides or Overrides()
    for backbone in backbones:
        for init in backbone_inits(backbone, inits, base.plugins):
            for strategy in strategies:
                changes = overrides.changes(strategy, init)
                for seed in seeds:
                    for fold in folds:
                        requested = base.replace(backbone=backbone, init=init, strategy=strategy, seed=seed,
                                                 fold=fold, **changes)
                        rows.append(plan_row(len(rows) + 1, requested, {k: str(v) for k, v in changes.items()}))
    return rows


def sweep_folds(base: TrainConfig, folds: str | None, fold: str | None) -> tuple[TrainConfig, list[int]]:
    """The sweep's fold axis: the base config (with its --folds count) and the folds to train.

    Data with a split of its own (split files, --splits, DTD's partitions): `--folds 1-3` or
    `--folds 2` selects its folds by their numbers (all of them by default). Other data: `--folds
    K` makes K stratified folds of one pool, all trained unless `--fold 0,2` picks some."""
    # here: the data readers load torch, and the CLI imports this module on its fast paths
    from mlexp.data.official import describe_folds, official_folds

    official = official_folds(base)
    if official:
        if folds and fold:
            raise MlexpError(f"{describe_folds(base, official)}; choose its folds with --folds or --fold, not both")
        chosen = parse_folds(folds or fold) if folds or fold else official
        absent = [number for number in chosen if number not in official]
        if absent:
            raise MlexpError(f"{describe_folds(base, official)}; it has no fold {absent[0]}")
        return base.replace(folds=0, fold=chosen[0]), chosen
    if folds and is_fold_list(folds):
        raise MlexpError(f"--folds {folds} selects folds of a split the data brings (DATA/labels/trainN.txt, "
                         f"--splits FILE, torchvision:DTD), but --data {base.data} has none: --folds K makes K "
                         "stratified folds, and --fold 0,2 chooses some of them")
    count = parse_value("folds", int, folds) if folds else base.folds
    base = base.replace(folds=count, fold=0)  # validates the count
    chosen = parse_folds(fold, "--fold") if fold else list(range(count)) if count else [0]
    if count and any(number >= count for number in chosen):
        raise MlexpError(f"--fold {fold}: --folds {count} numbers its folds 0-{count - 1}")
    if not count and chosen != [0]:
        raise MlexpError(f"--fold {fold} picks folds of a k-fold split: add --folds K")
    return base.replace(fold=chosen[0]), chosen


def backbone_inits(backbone: str, inits: list[str], plugins: str | None = None) -> list[str]:
    """The inits to try for one backbone name: its own if the name fixes it. An unknown
    name, or one with none of the asked inits, stops the sweep before anything starts."""
    try:
        fixed = resolve_backbone(backbone, "auto", plugins)
        if backbone != fixed.arch and not fixed.plugin:  # the name itself says pretrained or scratch
            return [fixed.init]
    except MlexpError:
        pass  # a timm model name needs an explicit init: tried below
    options, errors = [], []
    for init in inits:
        try:
            resolve_backbone(backbone, init, plugins)
            options.append(init)
        except MlexpError as error:
            errors.append(error)
    if not options:  # unknown: the error names the closest names
        raise errors[0] if errors else MlexpError(f"backbone {backbone}: no init to try")
    return options


def plan_row(index: int, requested: TrainConfig, overridden: dict[str, str] | None = None) -> PlanRow:
    spec = resolve_backbone(requested.backbone, requested.init, requested.plugins)
    effective = apply_init_adjustments(requested, spec)
    return PlanRow(index, requested, spec, effective, config_hash(effective), dict(overridden or {}))


def format_plan(rows: list[PlanRow]) -> str:
    lines = [f"Training plan: {len(rows)} configuration(s)"]
    for row in rows:
        cfg = row.effective
        lines.append(f"  {row.index:>3}. {row.label:<42} epochs={cfg.epochs:<4} "
                     f"lr={cfg.lr:<8g} warmup={cfg.warmup_epochs:<5g} wd={cfg.weight_decay:g}")
    return "\n".join(lines)


def dry_run_comparison(rows: list[PlanRow]) -> str:
    """Pretrained vs scratch values per architecture, derived from one request; with per-strategy
    or per-init values each row asked for something else, so the plan's lines are the truth."""
    if any(row.overridden for row in rows):
        return ("Per-strategy / per-init values (--strategy-epochs, --strategy-lr, --init-epochs, --init-lr): each "
                "run's effective epochs and lr are in the plan below.")
    return format_init_comparison([row.requested for row in rows])


def grid_params(backbones: list[str], inits: list[str], strategies: list[str], seeds: list[int],
                folds: list[int], rows: list[PlanRow], overrides: Overrides | None = None) -> dict[str, str]:
    """The parent run's params: each axis of the grid, its size, and the per-strategy and
    per-init overrides as given (sweep.strategy_epochs = linear=15,full=30)."""
    folds = [str(fold) for fold in folds]
    axes = {"backbones": backbones, "inits": inits, "strategies": strategies, "seeds": [str(s) for s in seeds],
            "folds": folds}
    params = {f"sweep.{name}": ",".join(values) for name, values in axes.items()}
    params["sweep.size"] = f"{len(rows)} runs"
    params.update({f"sweep.{option}": spec for option, spec in (overrides.specs if overrides else {}).items()})
    return params


def sweep_name(backbones: list[str], rows: list[PlanRow]) -> str:
    return f"sweep {'+'.join(backbones)} ({len(rows)} runs)"


def grid_hash(rows: list[PlanRow]) -> str:
    """The grid's identity: two launchers of the same grid find the same parent run."""
    return hashlib.sha256(",".join(sorted(row.config_hash for row in rows)).encode()).hexdigest()[:16]
