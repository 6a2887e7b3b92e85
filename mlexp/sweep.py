"""Sweeps: a grid over backbones x inits x strategies x seeds x folds, as nested MLflow runs.

The sweep is a parent run; every configuration is a child run created up front, so a
configuration that fails before training starts (unknown backbone, missing weights) still
shows up in MLflow as FAILED, with its error. Each child carries the hash of its effective
config as a tag: a configuration that already FINISHED anywhere in the experiment is
skipped, so re-running an interrupted sweep trains only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from mlexp import tracking
from mlexp.backbones import resolve_backbone
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
    """One configuration of the grid: its effective config (or why it cannot run)."""

    index: int
    requested: TrainConfig
    effective: TrainConfig | None
    config_hash: str
    error: str | None = None

    @property
    def label(self) -> str:
        cfg = self.effective or self.requested
        fold = f" fold {cfg.fold}" if cfg.folds else ""
        init = "" if self.effective else f" ({cfg.init})"
        return f"{cfg.backbone}{init} {cfg.strategy} seed {cfg.seed}{fold}"


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
    folds = range(base.folds) if base.folds else [base.fold]
    for backbone in backbones:
        for init in backbone_inits(backbone, inits):
            for strategy in strategies:
                for seed in seeds:
                    for fold in folds:
                        requested = base.replace(backbone=backbone, init=init, strategy=strategy, seed=seed,
                                                 fold=fold)
                        rows.append(plan_row(len(rows) + 1, requested))
    return rows


def backbone_inits(backbone: str, inits: list[str]) -> list[str]:
    """The inits to try for one backbone name: its own if the name fixes it."""
    try:
        fixed = resolve_backbone(backbone, "auto")
    except MlexpError:
        fixed = None
    if fixed is not None and backbone != fixed.arch:  # the name itself says pretrained or scratch
        return [fixed.init]
    options = []
    for init in inits:
        try:
            resolve_backbone(backbone, init)
            options.append(init)
        except MlexpError:
            if fixed is None:  # unknown name: keep it so the failure is reported
                options.append(init)
    return options


def plan_row(index: int, requested: TrainConfig) -> PlanRow:
    try:
        spec = resolve_backbone(requested.backbone, requested.init)
        effective = apply_init_adjustments(requested, spec)
        return PlanRow(index, requested, effective, config_hash(effective))
    except MlexpError as error:
        return PlanRow(index, requested, None, config_hash(requested), str(error))


def format_plan(rows: list[PlanRow]) -> str:
    lines = [f"Training plan: {len(rows)} configuration(s)"]
    for row in rows:
        if row.effective is None:
            lines.append(f"  {row.index:>3}. {row.label:<42} cannot run: {row.error}")
            continue
        cfg = row.effective
        lines.append(f"  {row.index:>3}. {row.label:<42} init={cfg.init:<10} epochs={cfg.epochs:<4} "
                     f"lr={cfg.lr:<8g} warmup={cfg.warmup_epochs:<5g} wd={cfg.weight_decay:g}")
    return "\n".join(lines)


def finished_hashes(client, experiment_id: str) -> dict[str, str]:
    """config hash -> run id of every FINISHED run in the experiment that has one."""
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50000)
    return {run.data.tags["mlexp.config_hash"]: run.info.run_id for run in runs
            if "mlexp.config_hash" in run.data.tags}


def run_sweep(base: TrainConfig, backbones: list[str], inits: list[str], strategies: list[str],
              seeds: list[int]) -> SweepResult:
    """Train every configuration of the grid that has not finished before; summarise."""
    from mlexp.train import run_training

    rows = expand_grid(base, backbones, inits, strategies, seeds)
    if base.dry_run:  # the configuration comparison, then the plan
        runnable = [row.requested for row in rows if row.effective is not None]
        if runnable:
            print(format_init_comparison(runnable) + "\n", flush=True)
    print(format_plan(rows), flush=True)
    if base.dry_run:
        return SweepResult(None)
    check_data_source(base)  # bad data is a user error before any run exists, not a sweep of FAILED children
    uri = base.tracking_uri or tracking.default_tracking_uri()
    offline = tracking.offline_requested(base.offline)
    parent = tracking.open_run(uri, base.experiment, base.run_name or "sweep", offline=offline,
                               tags={"mlexp.sweep": "true", "mlexp.sweep_size": str(len(rows))})
    result = SweepResult(parent.run_id)
    try:
        # Offline, the server's finished runs cannot be looked up: every configuration trains.
        done = {} if offline else finished_hashes(parent.client, experiment_of(parent))
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
    delivery = parent.finish("FINISHED")
    if not delivery.complete:
        print(f"mlexp: sweep run {delivery.run_id}: {delivery.describe()}", flush=True)
    return result


def experiment_of(parent: tracking.RunTracker) -> str:
    return parent.experiment_id()


def create_child(parent: tracking.RunTracker, row: PlanRow) -> str:
    tags = {"mlexp.sweep_id": parent.run_id, "mlexp.config_hash": row.config_hash}
    return tracking.create_child_run(parent, "-".join(row.label.replace("(", "").replace(")", "").split()), tags)


def run_child(run_training, tracking_uri: str, offline: bool, row: PlanRow, run_id: str) -> bool:
    """Train one child; any failure ends that child FAILED with its error and the sweep goes on."""
    if row.effective is None:
        end_untrained_child(tracking_uri, offline, run_id, "FAILED", row.error or "cannot run")
        return False
    try:
        # the requested config: run_training applies the init adjustments itself (once)
        run_training(row.requested.replace(dry_run=False, offline=offline), run_id=run_id)
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
    """The final summary: the best run of each backbone (catalogue name) by best/val_acc."""
    best: dict[str, dict] = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        acc = run.data.metrics.get("best/val_acc")
        backbone = run.data.params.get("effective.backbone", run.data.params.get("backbone", "?"))
        if acc is not None and (backbone not in best or acc > best[backbone]["best_val_acc"]):
            best[backbone] = {"backbone": backbone, "run_id": run_id, "run_name": run.info.run_name,
                              "strategy": run.data.tags.get("mlexp.strategy"), "best_val_acc": acc,
                              "best_epoch": run.data.metrics.get("best/epoch"),
                              "time_s": run.data.metrics.get("time/total_s")}
    return sorted(best.values(), key=lambda row: -row["best_val_acc"])


def report(parent: tracking.RunTracker, result: SweepResult) -> None:
    lines = [f"\nSweep {result.parent_run_id}: {len(result.finished)} finished, {len(result.failed)} failed, "
             f"{len(result.skipped)} skipped", "", "Best run per backbone:",
             f"  {'backbone':<24} {'best val acc':>12} {'epoch':>5}  {'strategy':<8} run"]
    for row in result.best:
        lines.append(f"  {row['backbone']:<24} {row['best_val_acc']:>12.4f} {row['best_epoch'] or 0:>5.0f}  "
                     f"{row['strategy'] or '':<8} {row['run_id']}")
    text = "\n".join(lines)
    print(text, flush=True)
    folder = Path(tempfile.mkdtemp(prefix="mlexp-sweep-"))
    (folder / "sweep_summary.txt").write_text(text.strip() + "\n")
    (folder / "sweep_summary.json").write_text(json.dumps(
        {"finished": result.finished, "failed": result.failed, "skipped": result.skipped, "best": result.best},
        indent=2))
    parent.log_metrics({"sweep/finished": len(result.finished), "sweep/failed": len(result.failed),
                        "sweep/skipped": len(result.skipped)}, step=0)
    parent.log_artifacts(folder, "summary")
