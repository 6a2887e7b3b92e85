"""The commands that read runs back or look after them: `compare`, `monitor`, `sync`, `reap`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from mlexp.analysis import monitor
from mlexp.commands.declarations import CompareOptions, MonitorOptions, ReapOptions, SyncOptions
from mlexp.commands.options import CONTEXT, declared_options, parse_options
from mlexp.tracking import check_reachable, default_tracking_uri
from mlexp.tracking.sync import sync


@click.command("compare", context_settings=CONTEXT)
@declared_options(CompareOptions)
def compare_command(**values: Any) -> None:
    """Compare finished runs: does pretraining help, which strategy wins, at what cost.

    Pairs runs on seed and fold, reports each difference with a 95% bootstrap interval, a
    permutation p-value (Holm-adjusted) and P(A beats B), and answers the research questions
    in words in report.md. --pair compares any two arms (sets of KEY=VALUE conditions) the same way.

    \b
    Examples:
      mlexp compare --experiment digits-sweep
      mlexp compare --experiment digits-sweep --features --metric test/acc
      mlexp compare --experiment a b --group-by arch init --out report/
      mlexp compare --experiment digits-sweep --filter "params.epochs = '10'" --group-by strategy,lr
      mlexp compare --experiment digits-sweep --pair 'init=pretrained,strategy=linear vs init=scratch,strategy=full'
    """
    compare_with(values)


def compare_with(values: dict[str, Any], run_id: str | None = None) -> None:
    """Compare as the options say; `run_id`: log the outputs into that existing run."""
    from mlexp.analysis.compare import format_table, run_compare  # here: pandas and matplotlib load for compare only

    own = parse_options(CompareOptions, values)
    result = run_compare(own.tracking_uri, list(own.experiment), own.filter, list(own.group_by), Path(own.out),
                         compare_experiment=own.compare_experiment, log_run=own.log_run, run_id=run_id,
                         metric=own.metric, equal_budget=own.equal_budget, between_backbones=own.between_backbones,
                         features=own.features, arm_pairs=list(own.pair))
    click.echo(format_table(result))
    click.echo(f"Wrote {len(result.files)} files to {own.out}/ (the research questions answered: {own.out}/report.md)"
               + (f"; logged to MLflow run {result.run_id}" if result.run_id else ""))


@click.command("monitor", context_settings=CONTEXT)
@declared_options(MonitorOptions)
def monitor_command(**values: Any) -> None:
    """Training monitor: progress of running runs, summary of finished ones (plots: `mlexp compare`).

    \b
    Examples:
      mlexp monitor --progress --watch 30
      mlexp monitor --summary --experiment digits-sweep
    """
    monitor_with(values)


def monitor_with(values: dict[str, Any]) -> None:
    own = parse_options(MonitorOptions, values)
    uri = reachable_uri(own.tracking_uri)
    views = ([monitor.progress] if own.progress else []) + ([monitor.summary] if own.summary else [])
    while True:
        for show in views or [monitor.progress]:
            click.echo(show(uri, list(own.experiment) or None))
        if own.watch <= 0:
            return
        time.sleep(own.watch)
        click.echo()


def reachable_uri(tracking_uri: str | None) -> str:
    """The store a reading command talks to (the default one when not given), checked reachable."""
    uri = tracking_uri or default_tracking_uri()
    check_reachable(uri)
    return uri


@click.command("sync", context_settings=CONTEXT)
@declared_options(SyncOptions)
def sync_command(**values: Any) -> None:
    """Send what outboxes still hold: runs killed or ended during an outage, and offline runs.

    Every run writes everything to a local outbox first ($MLEXP_OUTBOX_DIR, default
    ~/.local/share/mlexp/outbox) and sends it from there. What a process could not send
    before it ended waits there until `mlexp sync`. Safe to repeat: nothing is sent twice.

    \b
    Examples:
      mlexp sync --all --dry-run
      mlexp sync --run 3f2a...            (a run that ended while the server was away)
      mlexp sync --all --to http://mlflow.example:5000    (runs recorded with --offline)
    """
    own = parse_options(SyncOptions, values)
    results = sync(own.run, own.all, own.to, own.dry_run, echo=click.echo, verbose=own.verbose)
    if any(result.damaged or (result.after is not None and not result.complete) for result in results):
        sys.exit(1)


@click.command("reap", context_settings=CONTEXT)
@declared_options(ReapOptions)
def reap_command(**values: Any) -> None:
    """Mark lost runs FAILED: RUNNING runs whose heartbeat stopped (killed process, lost machine).

    A live run beats every 30 s ($MLEXP_HEARTBEAT_S); one silent for 1.5 periods is lost.
    Each reaped run gets `mlexp.error` saying why, and can still be resumed with
    `mlexp train --resume RUN_ID`.
    """
    own = parse_options(ReapOptions, values)
    lines = monitor.reap(reachable_uri(own.tracking_uri), list(own.experiment) or None, own.dry_run)
    click.echo("\n".join(lines) if lines else "No lost runs.")
