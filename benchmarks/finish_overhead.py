"""What the end of a run costs: from its last epoch to the run being FINISHED on a live server.

Trains the same run against a real `mlflow server` on 127.0.0.1, alternating two ways:

- plain:  --log-models false --system-metrics false (the end-of-run report and checkpoints only)
- full:   the defaults: logged models best and final (pyfunc, linked to their steps' metrics and
          the datasets), dataset inputs, system metrics

and prints, per pair and as medians, the seconds from the last epoch's val/acc point to the
run's end time on the server, and the difference full - plain.

    python benchmarks/finish_overhead.py                       # resnet18, digits, 3 pairs
    python benchmarks/finish_overhead.py --backbone resnet50 --img-size 64 --pairs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlexp.tracking.local_server import start_local_server, stop_local_server  # noqa: E402

WAYS = {"plain": ["--log-models", "false", "--system-metrics", "false"], "full": []}


def one_run(uri: str, way: str, args: argparse.Namespace, workdir: Path, index: int) -> float:
    from mlflow import MlflowClient

    name = f"{way}-{index}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               MLEXP_OUTBOX_DIR=str(workdir / "outbox"))
    command = [sys.executable, "-m", "mlexp", "train", "--backbone", args.backbone, "--init", "scratch", "--data", "digits",
               "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--scratch-epochs-mult", "1",
               "--test-split", "0.2", "--experiment", "finish-overhead", "--run-name", name, *WAYS[way]]
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("finish-overhead")
    [run] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    last_epoch = max(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda point: point.step)
    return (run.info.end_time - last_epoch.timestamp) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", help="trained from scratch")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlexp-finish-") as folder:
        workdir = Path(folder)
        server, uri = start_local_server(workdir / "server")
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        try:
            for index in range(args.pairs):
                order = list(WAYS) if index % 2 == 0 else list(reversed(WAYS))  # alternate who goes first
                for way in order:
                    seconds[way].append(one_run(uri, way, args, workdir, index))
                print(f"pair {index + 1}: plain {seconds['plain'][-1]:.2f} s, full {seconds['full'][-1]:.2f} s, "
                      f"difference {seconds['full'][-1] - seconds['plain'][-1]:+.2f} s", flush=True)
        finally:
            stop_local_server(server)
    plain, full = statistics.median(seconds["plain"]), statistics.median(seconds["full"])
    print(f"\n{args.backbone} at {args.img_size}px, {args.epochs} epochs, last epoch -> FINISHED on a live server "
          f"(median of {args.pairs}): plain {plain:.2f} s, full {full:.2f} s; logged models, datasets and system "
          f"metrics add {full - plain:+.2f} s per run")


if __name__ == "__main__":
    main()
