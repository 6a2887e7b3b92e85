"""Benchmark: `mlexp compare` over 2,000 finished runs on a local `mlflow server`, curves included.

    .venv/bin/python benchmarks/compare_2000_runs.py            # fresh server in a temp folder
    .venv/bin/python benchmarks/compare_2000_runs.py --keep /tmp/cmp-bench   # keep (and reuse) the store
    .venv/bin/python benchmarks/compare_2000_runs.py --backend postgresql://USER@HOST:PORT/DB  # the server on PostgreSQL

Creates the runs through the server with `log_batch` (one call per run: ~50 params, 8 tags,
10 epochs x 9 metrics and the end-of-run summary), which is not the measured part, then times
`compare()` end to end: search, metric histories, statistics, tables and plots. The target
is 2,000 runs in under 3 s and 10,000 in under 10 s, first call included (not reached: the
server's own search takes about 3 s per 1,000 runs; README "Comparing runs"). It also prints
which MLflow doors answered (mlexp.analysis.mlflow_internals): a fallback to the public API
there means an MLflow upgrade closed a fast path.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

from mlexp.analysis.compare import compare, format_table  # noqa: E402
from mlexp.config import TrainConfig  # noqa: E402
from mlexp.tracking.local_server import start_local_server  # noqa: E402

BACKBONES = {"resnet18": 11_181_642, "resnet50": 23_528_522, "deit_small": 21_669_514, "vgg16": 134_301_514}
INITS = ("pretrained", "scratch")
STRATEGIES = ("full", "linear", "gradual")
EPOCHS = 10
EXPERIMENT = "bench-compare"


def one_run(client: MlflowClient, experiment_id: str, index: int) -> None:
    """Create one finished run with the full logging contract and realistic curves."""
    combos = [(b, i, s) for b in BACKBONES for i in INITS for s in STRATEGIES]
    backbone, init, strategy = combos[index % len(combos)]
    repeat = index // len(combos)
    seed, fold = 40 + repeat // 5, repeat % 5
    rng = random.Random(index)
    epochs = EPOCHS
    cfg = TrainConfig(backbone=f"{backbone}_{init}", init=init, strategy=strategy, seed=seed,
                      folds=5, fold=fold, epochs=epochs)
    params = cfg.to_params() | {"distributed_type": "NO", "num_processes": "1"}
    run_name = f"{backbone}-{init}-{strategy}-s{seed}-f{fold}"
    tags = {"mlexp.backbone": backbone, "mlexp.init": init, "mlexp.strategy": strategy,
            "mlexp.dataset": "digits", "mlexp.version": "0.1.0", "mlexp.sweep_id": "bench",
            "mlexp.config_hash": f"{index:08x}", "mlflow.runName": run_name}
    ceiling = (0.97 if init == "pretrained" else 0.90) - (0.05 if strategy == "linear" else 0.0)
    speed = 0.6 if init == "pretrained" else 0.3
    trainable = BACKBONES[backbone] if strategy != "linear" else 5_130
    t0 = int(time.time() * 1000)
    metrics, best, best_epoch, total = [], 0.0, 1, 0.0
    for epoch in range(1, epochs + 1):
        val_acc = ceiling * (1 - (1 - speed) ** epoch) + rng.gauss(0, 0.01)
        train_acc = min(1.0, val_acc + 0.02 * epoch / epochs + rng.gauss(0, 0.005))
        epoch_time = 30.0 * (trainable / 2e7 + 0.5) + rng.gauss(0, 1)
        total += epoch_time
        if val_acc > best:
            best, best_epoch = val_acc, epoch
        values = {"train/loss": 2.3 * (1 - train_acc) + 0.05, "train/loss_total": 2.3 * (1 - train_acc) * 45,
                  "train/acc": train_acc, "val/loss": 2.3 * (1 - val_acc) + 0.1, "val/acc": val_acc,
                  "epoch/time_s": epoch_time, "epoch/lr": 1e-3 * (1 - epoch / epochs),
                  "train/trainable_params": trainable, "train/phase": 0}
        metrics += [Metric(k, float(v), t0 + epoch, epoch) for k, v in values.items()]
    final = {"best/val_acc": best, "best/epoch": best_epoch, "time/total_s": total + 5.0,
             "model/params_total": BACKBONES[backbone], "model/params_trainable": trainable}
    metrics += [Metric(k, float(v), t0 + epochs + 1, 0) for k, v in final.items()]
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param(k, v) for k, v in params.items()], tags=[])
    client.set_terminated(run.info.run_id, "FINISHED")


def populate(uri: str, n_runs: int) -> None:
    client = MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is not None:
        return
    experiment_id = client.create_experiment(EXPERIMENT)
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: one_run(client, experiment_id, i), range(n_runs)))
    print(f"created {n_runs} runs in {time.perf_counter() - started:.1f} s (not measured)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--keep", type=Path, help="store folder to keep and reuse between invocations")
    parser.add_argument("--repeat", type=int, default=2, help="time compare this many times")
    parser.add_argument("--backend", help="the server's backend store URI (an empty PostgreSQL database is filled "
                        "once, then reused); default: SQLite in the store folder")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mlexp-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    proc, uri = start_local_server(root, backend=args.backend)
    try:
        populate(uri, args.runs)
        client = MlflowClient(uri)
        figures = []
        for attempt in range(args.repeat):
            out_dir = root / f"compare-out-{attempt}"
            started = time.perf_counter()
            result = compare(client, [EXPERIMENT], None, None, out_dir)
            elapsed = time.perf_counter() - started
            figures.append(elapsed)
            print(f"compare over {len(result.runs)} runs ({len(result.groups)} groups, curves and plots included): "
                  f"{elapsed:.2f} s  [{', '.join(f'{k} {v:.2f}s' for k, v in result.timings.items())}]  "
                  f"load average {os.getloadavg()[0]:.2f}")
            print(f"  MLflow reads: {result.reads['taken']}"
                  + (f"; FELL BACK: {result.reads['fallbacks']}" if result.reads["fallbacks"] else ""))
        print(format_table(result))
        print(f"RESULT: compare over {len(result.runs)} runs: first call {figures[0]:.2f} s, "
              f"best {min(figures):.2f} s (the target: 2,000 runs in under 3 s, 10,000 in under 10 s, "
              "first call included)")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
