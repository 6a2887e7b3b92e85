"""What a sweep says when it ends: how many runs finished, failed, were skipped or trained
elsewhere, and the best run of each backbone by the runs' own score (val acc, a detector's val
mAP, or the metric a task of the user's own chose its best epoch by); printed, and logged on the
parent run as summary/sweep_summary.txt and summary/sweep_summary.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlexp import tracking
from mlexp.option_values import best_is_max
from mlexp.sweep.local_executor import best_score
from mlexp.sweep.plan import display_name
from mlexp.sweep.progress import clock


@dataclass
class SweepResult:
    parent_run_id: str | None
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # FINISHED before this sweep started
    elsewhere: list[str] = field(default_factory=list)  # trained meanwhile by another launcher
    killed: list[str] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)


def best_per_backbone(client, run_ids: list[str]) -> list[dict]:
    """The final summary: the best run of each backbone by best/val_acc (a detector's by
    best/val_map, in `best_val_map`; a task of the user's own by the metric its runs chose their
    best epoch by, e.g. `best_val_r2`, lowest first where they chose a minimum), named as
    `mlexp compare` and `mlexp backbones` name them (resnet18_pretrained, resnet18_scratch), with
    how many of its runs finished and the training time they took together (time/total_s)."""
    best: dict[str, dict] = {}
    runs, seconds = {}, {}  # per backbone: its runs, and the training time they took together
    for run_id in run_ids:
        run = client.get_run(run_id)
        name, score = best_score(run.data.metrics, run.data.params) or ("", None)
        column = f"best_{name.replace(' ', '_')}".replace("mAP", "map")
        higher = name in ("val acc", "val mAP") or best_is_max(name.replace(" ", "/"),
                                                                run.data.params.get("best_mode", "auto"))
        backbone = display_name(run.data.params.get("effective.backbone", run.data.params.get("backbone", "?")),
                                run.data.tags.get("mlexp.init", ""))
        runs[backbone] = runs.get(backbone, 0) + 1
        seconds[backbone] = seconds.get(backbone, 0.0) + run.data.metrics.get("time/total_s", 0.0)
        if score is None:  # a run without a best score (an older or failed one): counted, never the best
            continue
        held = best[backbone].get(column) if backbone in best else None
        if held is None or (score > held if higher else score < held):
            best[backbone] = {"backbone": backbone, "run_id": run_id, "run_name": run.info.run_name,
                              "strategy": run.data.tags.get("mlexp.strategy"), column: score,
                              "best_epoch": run.data.metrics.get("best/epoch"),
                              "time_s": run.data.metrics.get("time/total_s"), "score": name,
                              "higher_is_better": higher}
    for backbone, row in best.items():
        row.update(runs=runs[backbone], total_time_s=seconds[backbone])
    return sorted(best.values(), key=lambda row: -row[scored(row)] if row["higher_is_better"] else row[scored(row)])


def scored(row: dict) -> str:
    """The column holding a summary row's score (best_val_acc, best_val_map, best_val_r2, ...)."""
    return f"best_{row['score'].replace(' ', '_')}".replace("mAP", "map")


def summary_text(result: SweepResult) -> str:
    counts = {"finished": len(result.finished), "finished by another launcher": len(result.elsewhere),
              "failed": len(result.failed), "killed": len(result.killed), "skipped": len(result.skipped)}
    lines = [f"\nSweep {result.parent_run_id}: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n)]
    if result.best:
        label, column = result.best[0]["score"], scored(result.best[0])
        header = (f"  {'backbone':<24} {'best ' + label:>12} {'epoch':>5}  {'strategy':<8} "
                  f"{'runs':>4} {'train time':>10}")
        lines += ["", "Best run per backbone:", f"{header}  run"]
        lines += [f"  {row['backbone']:<24} {row[column]:>12.4f} {row['best_epoch'] or 0:>5.0f}  "
                  f"{row['strategy'] or '':<8} {row['runs']:>4} {clock(row['total_time_s']):>10}  {row['run_id']}"
                  for row in result.best]
        lines += [f"  training time, all backbones: {clock(sum(row['total_time_s'] for row in result.best))}"]
    if result.failed:
        lines += ["", "FAILED (their errors are in each run's mlexp.error tag):", *(f"  {run}" for run in result.failed)]
    return "\n".join(lines)


def report(parent: tracking.RunTracker | None, result: SweepResult) -> None:
    text = summary_text(result)
    print(text, flush=True)
    if parent is None:
        return
    folder = parent.staging_dir("sweep-summary")
    (folder / "sweep_summary.txt").write_text(text.strip() + "\n")
    (folder / "sweep_summary.json").write_text(json.dumps(
        {"finished": result.finished, "failed": result.failed, "skipped": result.skipped,
         "elsewhere": result.elsewhere, "killed": result.killed, "best": result.best,
         "total_time_s": sum(row["total_time_s"] for row in result.best)}, indent=2))
    parent.log_artifacts(folder, "summary")
