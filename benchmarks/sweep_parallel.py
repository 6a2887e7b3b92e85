"""Sweep throughput: 8 tiny configurations trained one at a time vs `--parallel 2`, side by
side against one local `mlflow server`, and the launcher's own cost per child.

    .venv/bin/python benchmarks/sweep_parallel.py [--rounds 2]

Each round runs the same grid (test_resnet, digits, 16 px, 1 epoch, seeds 1..8) twice, in a
fresh experiment each time (a configuration FINISHED before would be skipped): sequential
(`--parallel 1`, the child gets every core) then `--parallel 2` (two children, one thread
each on these 2-core machines). Printed: the wall times, their ratio, and the overhead per
child: the sequential wall time per child minus the training time the child itself
measured (`time/total_s`), i.e. process start, imports, data, model build and MLflow I/O.
Bare imports alone (`python -c "import mlexp.training.run"`) are timed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlexp.tracking.local_server import start_local_server, stop_local_server  # noqa: E402

GRID = ["sweep", "--backbones", "test_resnet", "--inits", "scratch", "--seeds", "1,2,3,4,5,6,7,8",
        "--data", "digits", "--img-size", "16", "--epochs", "1", "--batch-size", "64", "--scratch-epochs-mult", "1",
        "--calibrate", "false"]


def sweep(uri: str, experiment: str, parallel: int, folder: Path) -> tuple[float, float]:
    """(wall seconds of the whole sweep, sum of the children's own training seconds)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlexp", *GRID, "--experiment", experiment,
                           "--parallel", str(parallel)], env=env, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sweep failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    children = [run for run in client.search_runs([found.experiment_id]) if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == 8 and all(run.info.status == "FINISHED" for run in children)
    return wall, sum(run.data.metrics["time/total_s"] for run in children)


def import_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mlexp.training.run"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    folder = Path(tempfile.mkdtemp(prefix="mlexp-bench-sweep-"))
    server, uri = start_local_server(folder / "server")
    results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    try:
        for round_index in range(rounds):
            for parallel in (1, 2):
                wall, trained = sweep(uri, f"bench-{round_index}-p{parallel}", parallel, folder)
                results[parallel].append((wall, trained))
                print(f"round {round_index + 1}: --parallel {parallel}: {wall:6.1f} s wall "
                      f"(children trained {trained:5.1f} s in all)", flush=True)
    finally:
        stop_local_server(server)
    sequential = statistics.median(wall for wall, _ in results[1])
    parallel = statistics.median(wall for wall, _ in results[2])
    overhead = statistics.median((wall - trained) / 8 for wall, trained in results[1])
    imports = statistics.median(import_seconds() for _ in range(3))
    print(f"\n8 configurations on {os.cpu_count()} cores, median of {rounds} round(s):")
    print(f"  sequential (--parallel 1): {sequential:6.1f} s")
    print(f"  --parallel 2:              {parallel:6.1f} s")
    print(f"  speed-up:                  {sequential / parallel:6.2f}x")
    print(f"  overhead per child (sequential wall / 8 - its own training time): {overhead:.1f} s")
    print(f"    of which bare imports (python -c 'import mlexp.training.run'): {imports:.1f} s")


if __name__ == "__main__":
    main()
