"""Training throughput with MLflow tracking to a live local server vs tracking off.

The same loop (resnet18 from scratch, 32 px, batch 32, built-in digits, one process on
CPU) is trained alternately with tracking on and off, several rounds, and the ratio of
training samples per second is printed. Per-batch metrics, checkpoints and artifacts are
all logged in the tracked runs, exactly as `mlexp train` does. Target: ratio >= 0.98.

    python benchmarks/tracking_overhead.py [--rounds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from mlexp.local_server import start_local_server  # noqa: E402


def train_throughput(track: bool, uri: str, epochs: int) -> tuple[float, float]:
    """Training samples per second: inside the epochs' loops, and over the whole run (wall clock)."""
    from mlflow import MlflowClient

    from mlexp.config import TrainConfig
    from mlexp.train import run_training

    cfg = TrainConfig(backbone="resnet18_scratch", data="digits", img_size=32, batch_size=32, epochs=epochs,
                      scratch_epochs_mult=1.0, calibrate=False, tracking_uri=uri, experiment="bench-tracking")
    start = time.perf_counter()
    result = run_training(cfg, track=track)
    wall = time.perf_counter() - start
    history = result.history
    samples = sum(row["samples"] for row in history.epochs)
    seconds = sum(row["epoch_time_sec"] for row in history.epochs)
    if track:
        run = MlflowClient(uri).get_run(result.run_id)
        assert run.info.status == "FINISHED"
    return samples / seconds, samples / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        server, uri = start_local_server(Path(tmp))
        try:
            train_throughput(False, uri, 1)  # warm-up: imports, allocator, data
            rates: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for round_index in range(args.rounds):
                # alternate the order so drift on a shared machine hits both sides alike
                for track in ((True, False) if round_index % 2 == 0 else (False, True)):
                    loop_rate, wall_rate = train_throughput(track, uri, args.epochs)
                    rates[track].append((loop_rate, wall_rate))
                    print(f"round {round_index + 1}: tracking {'on ' if track else 'off'} "
                          f"{loop_rate:8.1f} samples/s in the loop, {wall_rate:8.1f} over the whole run", flush=True)
        finally:
            server.terminate()
    for index, what in ((0, "training loop"), (1, "whole run, wall clock (build, eval, checkpoints)")):
        on = statistics.median(r[index] for r in rates[True])
        off = statistics.median(r[index] for r in rates[False])
        print(f"{what}: median samples/s tracked {on:.1f}, untracked {off:.1f}, ratio {on / off:.3f}")
    print("target: training-loop ratio >= 0.98")


if __name__ == "__main__":
    main()
