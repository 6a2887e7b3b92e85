"""Sweeps: a grid over backbones x inits x strategies x seeds x folds, as nested MLflow runs.

The whole grid is planned before anything starts: a backbone name that does not exist is a
user error (one line naming the closest names), not a sweep of FAILED runs. The sweep is a
parent run named after its grid, with the grid's axes as params; each configuration is a
child run carrying the hash of its effective config as a tag. A configuration that already
FINISHED anywhere in the experiment is skipped, so re-running an interrupted sweep trains
only what is missing (and a sweep with nothing left to train creates no run at all). A
configuration that fails ends FAILED with its error and the sweep goes on.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import dataclass, field

from mlexp import tracking
from mlexp.backbones import CATALOGUE, BackboneSpec, resolve_backbone
from mlexp.config import TrainConfig
from mlexp.data import check_data_source
from mlexp.errors import MlexpError
from mlexp.recipes import apply_init_adjustments, format_init_comparison
from mlexp.tracking.outbox import TERMINAL, Outbox

# Fields that say where and how a run is recorded, not what is trained: left out of the hash.
BOOKKEEPING = ("experiment", "run_name", "tracking_uri", "resume", "dry_run", "export_weights", "offline")
INITS = ("pretrained", "scratch")


@dataclass
class PlanRow:
    """One configuration of the grid: what the user asked for and its effective config."""

    index: int
    requested: TrainConfig
    spec: BackboneSpec
    effective: TrainConfig
    config_hash: str

    @property
    def label(self) -> str:
        cfg = self.effective
        fold = f" fold {cfg.fold}" if cfg.folds else ""
        return f"{display_name(cfg.backbone, cfg.init)} {cfg.strategy} seed {cfg.seed}{fold}"

    @property
    def run_name(self) -> str:
        """Short, so the MLflow UI does not cut off seed and fold: resnet18_scratch-full-s42-f1."""
        cfg = self.effective
        fold = f"-f{cfg.fold}" if cfg.folds else ""
        return f"{display_name(cfg.backbone, cfg.init)}-{cfg.strategy}-s{cfg.seed}{fold}"


def display_name(backbone: str, init: str) -> str:
    """The name the sweep summary and `mlexp compare` show: the catalogue name (resnet18_scratch),
    or a timm model name with its init (convnext_tiny_scratch)."""
    return backbone if backbone in CATALOGUE or backbone.endswith(f"_{init}") else f"{backbone}_{init}"


@dataclass
class SweepResult:
    parent_run_id: str | None
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)


def config_hash(cfg: TrainConfig) -> str:
    """A stable hash of what is trained (bookkeeping fields excluded)."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in BOOKKEEPING}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def expand_grid(base: TrainConfig, backbones: list[str], inits: list[str], strategies: list[str],
                seeds: list[int]) -> list[PlanRow]:
    """The numbered plan. A backbone named with its init (`resnet50_scratch`) keeps that init;
    one without a pretrained flavour (vit_small) is planned for scratch only."""
    rows: list[PlanRow] = []
    folds = grid_folds(base)
    for backbone in backbones:
        for init in backbone_inits(backbone, inits):
            for strategy in strategies:
                for seed in seeds:
                    for fold in folds:
                        requested = base.replace(backbone=backbone, init=init, strategy=strategy, seed=seed,
                                                 fold=fold)
                        rows.append(plan_row(len(rows) + 1, requested))
    return rows


def grid_folds(base: TrainConfig) -> list[int]:
    """Every fold with --folds K, else the one --fold."""
    return list(range(base.folds)) if base.folds else [base.fold]


def backbone_inits(backbone: str, inits: list[str]) -> list[str]:
    """The inits to try for one backbone name: its own if the name fixes it. An unknown
    name, or one with none of the asked inits, stops the sweep before anything starts."""
    try:
        fixed = resolve_backbone(backbone, "auto")
        if backbone != fixed.arch:  # the name itself says pretrained or scratch
            return [fixed.init]
    except MlexpError:
        pass  # a timm model name needs an explicit init: tried below
    options, errors = [], []
    for init in inits:
        try:
            resolve_backbone(backbone, init)
            options.append(init)
        except MlexpError as error:
            errors.append(error)
    if not options:  # unknown: the error names the closest names
        raise errors[0] if errors else MlexpError(f"backbone {backbone}: no init to try")
    return options


def plan_row(index: int, requested: TrainConfig) -> PlanRow:
    spec = resolve_backbone(requested.backbone, requested.init)
    effective = apply_init_adjustments(requested, spec)
    return PlanRow(index, requested, spec, effective, config_hash(effective))


def format_plan(rows: list[PlanRow]) -> str:
    lines = [f"Training plan: {len(rows)} configuration(s)"]
    for row in rows:
        cfg = row.effective
        lines.append(f"  {row.index:>3}. {row.label:<42} epochs={cfg.epochs:<4} "
                     f"lr={cfg.lr:<8g} warmup={cfg.warmup_epochs:<5g} wd={cfg.weight_decay:g}")
    return "\n".join(lines)


def grid_params(backbones: list[str], inits: list[str], strategies: list[str], seeds: list[int],
                base: TrainConfig, rows: list[PlanRow]) -> dict[str, str]:
    """The parent run's params: each axis of the grid and its size."""
    folds = [str(fold) for fold in grid_folds(base)]
    axes = {"backbones": backbones, "inits": inits, "strategies": strategies, "seeds": [str(s) for s in seeds],
            "folds": folds}
    params = {f"sweep.{name}": ",".join(values) for name, values in axes.items()}
    params["sweep.size"] = f"{len(rows)} runs"
    return params


def sweep_name(backbones: list[str], rows: list[PlanRow]) -> str:
    return f"sweep {'+'.join(backbones)} ({len(rows)} runs)"


def finished_hashes(client, experiment_id: str) -> dict[str, str]:
    """config hash -> run id of every FINISHED run in the experiment that has one."""
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50000)
    return {run.data.tags["mlexp.config_hash"]: run.info.run_id for run in runs
            if "mlexp.config_hash" in run.data.tags}


def run_sweep(base: TrainConfig, backbones: list[str], inits: list[str], strategies: list[str],
              seeds: list[int], parent_run_id: str | None = None) -> SweepResult:
    """Train every configuration of the grid that has not finished before; summarise.
    `parent_run_id`: an existing run to be the sweep's parent (the one `mlflow run` created)."""
    rows = expand_grid(base, backbones, inits, strategies, seeds)
    if base.dry_run:  # the configuration comparison, then the plan
        print(format_init_comparison([row.requested for row in rows]) + "\n", flush=True)
    print(format_plan(rows), flush=True)
    if base.dry_run:
        return SweepResult(None)
    check_data_source(base)  # bad data is a user error before any run exists, not a sweep of FAILED children
    uri = base.tracking_uri or tracking.default_tracking_uri()
    offline = tracking.offline_requested(base.offline)
    # Offline, the server's finished runs cannot be looked up: every configuration trains.
    done = {} if offline else finished_before(uri, base.experiment)
    if parent_run_id is None and rows and all(row.config_hash in done for row in rows):
        print(f"\nEvery configuration FINISHED before (runs {', '.join(done[row.config_hash] for row in rows)}); "
              "nothing to train.", flush=True)
        return SweepResult(None, skipped=[done[row.config_hash] for row in rows])
    parent = tracking.open_run(uri, base.experiment, base.run_name or sweep_name(backbones, rows),
                               run_id=parent_run_id, offline=offline,
                               tags={"mlexp.sweep": "true", "mlexp.sweep_size": str(len(rows))})
    parent.log_params(grid_params(backbones, inits, strategies, seeds, base, rows))
    result = SweepResult(parent.run_id)
    try:
        train_grid(parent, rows, done, uri, offline, result)
        if not offline:
            try:
                result.best = best_per_backbone(parent.client, experiment_of(parent),
                                                [*result.finished, *result.skipped])
            except Exception as error:  # noqa: BLE001 - a summary read is no reason to fail the sweep
                print(f"mlexp: no best-run summary: the server did not answer ({error})", flush=True)
        report(parent, result)
    except BaseException as error:
        parent.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED", error=str(error))
        raise
    every_one_failed = bool(result.failed) and not result.finished and not result.skipped
    delivery = parent.finish("FAILED" if every_one_failed else "FINISHED",
                             error="every configuration FAILED" if every_one_failed else None)
    if not delivery.complete:
        print(f"mlexp: sweep run {delivery.run_id}: {delivery.describe()}", flush=True)
    return result


def finished_before(tracking_uri: str, experiment: str) -> dict[str, str]:
    """config hash -> run id of the experiment's FINISHED runs (none if it does not exist yet)."""
    tracking.check_reachable(tracking_uri)
    client = tracking.client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return finished_hashes(client, found.experiment_id) if found is not None else {}


def train_grid(parent: tracking.RunTracker, rows: list[PlanRow], done: dict[str, str], uri: str, offline: bool,
               result: SweepResult) -> None:
    from mlexp.train import run_training

    for row in rows:
        print(f"\n[{row.index}/{len(rows)}] {row.label}", flush=True)
        if row.config_hash in done:
            print(f"  skipped: finished before as run {done[row.config_hash]}")
            result.skipped.append(done[row.config_hash])
            continue
        try:
            run_id = create_child(parent, row)
        except Exception as error:  # noqa: BLE001 - the server is away: this one waits for the next sweep
            print(f"  not started: its run could not be created ({error}); run the sweep again to train it",
                  flush=True)
            result.failed.append(f"(not created) {row.label}")
            continue
        if run_child(run_training, uri, offline, row, run_id):
            result.finished.append(run_id)
        else:
            result.failed.append(run_id)


def experiment_of(parent: tracking.RunTracker) -> str:
    return parent.experiment_id()


def create_child(parent: tracking.RunTracker, row: PlanRow) -> str:
    tags = {"mlexp.sweep_id": parent.run_id, "mlexp.config_hash": row.config_hash}
    return tracking.create_child_run(parent, row.run_name, tags)


def run_child(run_training, tracking_uri: str, offline: bool, row: PlanRow, run_id: str) -> bool:
    """Train one child; any failure ends that child FAILED with its error and the sweep goes on."""
    try:
        # the requested config: run_training applies the init adjustments itself (once)
        run_training(row.requested.replace(dry_run=False, offline=offline), run_id=run_id, spec=row.spec)
        return True
    except KeyboardInterrupt:
        end_untrained_child(tracking_uri, offline, run_id, "KILLED", "interrupted")
        raise
    except Exception as error:  # noqa: BLE001 - one bad configuration must not stop the sweep
        message = str(error) if isinstance(error, MlexpError) else f"{type(error).__name__}: {error}"
        if not isinstance(error, MlexpError):
            traceback.print_exc()
        end_untrained_child(tracking_uri, offline, run_id, "FAILED", message)
        print(f"  FAILED: {message}", flush=True)
        return False


def end_untrained_child(tracking_uri: str, offline: bool, run_id: str, status: str, message: str) -> None:
    """End a child whose training never opened it (it failed before); one that did has ended itself."""
    try:
        _end_untrained_child(tracking_uri, offline, run_id, status, message)
    except Exception as error:  # noqa: BLE001 - the sweep goes on; the child shows as lost, reap ends it
        print(f"  could not record how run {run_id} ended ({error})", flush=True)


def _end_untrained_child(tracking_uri: str, offline: bool, run_id: str, status: str, message: str) -> None:
    box = Outbox.find(run_id)
    if box is not None and box.info().status in TERMINAL:
        return
    if box is None and not offline:
        try:
            if tracking.client_for(tracking_uri).get_run(run_id).info.status != "RUNNING":
                return
        except Exception:  # noqa: BLE001 - the server is away: record the end in the outbox anyway
            pass
    tracking.end_run(tracking_uri, run_id, status, message, offline=offline)


def best_per_backbone(client, experiment_id: str, run_ids: list[str]) -> list[dict]:
    """The final summary: the best run of each backbone by best/val_acc, named as `mlexp
    compare` and `mlexp backbones` name them (resnet18_pretrained, resnet18_scratch)."""
    best: dict[str, dict] = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        acc = run.data.metrics.get("best/val_acc")
        backbone = display_name(run.data.params.get("effective.backbone", run.data.params.get("backbone", "?")),
                                run.data.tags.get("mlexp.init", ""))
        if acc is not None and (backbone not in best or acc > best[backbone]["best_val_acc"]):
            best[backbone] = {"backbone": backbone, "run_id": run_id, "run_name": run.info.run_name,
                              "strategy": run.data.tags.get("mlexp.strategy"), "best_val_acc": acc,
                              "best_epoch": run.data.metrics.get("best/epoch"),
                              "time_s": run.data.metrics.get("time/total_s")}
    return sorted(best.values(), key=lambda row: -row["best_val_acc"])


def summary_text(result: SweepResult) -> str:
    counts = {"finished": len(result.finished), "failed": len(result.failed), "skipped": len(result.skipped)}
    lines = [f"\nSweep {result.parent_run_id}: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n)]
    if result.best:
        lines += ["", "Best run per backbone:",
                  f"  {'backbone':<24} {'best val acc':>12} {'epoch':>5}  {'strategy':<8} run"]
        lines += [f"  {row['backbone']:<24} {row['best_val_acc']:>12.4f} {row['best_epoch'] or 0:>5.0f}  "
                  f"{row['strategy'] or '':<8} {row['run_id']}" for row in result.best]
    if result.failed:
        lines += ["", "FAILED (their errors are in each run's mlexp.error tag):", *(f"  {run}" for run in result.failed)]
    return "\n".join(lines)


def report(parent: tracking.RunTracker, result: SweepResult) -> None:
    text = summary_text(result)
    print(text, flush=True)
    folder = parent.staging_dir("sweep-summary")
    (folder / "sweep_summary.txt").write_text(text.strip() + "\n")
    (folder / "sweep_summary.json").write_text(json.dumps(
        {"finished": result.finished, "failed": result.failed, "skipped": result.skipped, "best": result.best},
        indent=2))
    parent.log_metrics({"sweep/finished": len(result.finished), "sweep/failed": len(result.failed),
                        "sweep/skipped": len(result.skipped)}, step=0)
    parent.log_artifacts(folder, "summary")
