"""Training throughput with MLflow tracking to a live local server vs tracking off.

The same loop (resnet18 from scratch, 32 px, batch 32, built-in digits, one process on
CPU) is trained in turn untracked, tracked (every write through the durable outbox,
SQLite synchronous=NORMAL, the default) and tracked with synchronous=FULL (an fsync per
commit), and tracked with every epoch's checkpoint uploaded during training
(MLEXP_CHECKPOINT_UPLOAD_S=0; by default a checkpoint goes up at most once a minute, the
ones a newer one replaced before that are never sent), several rounds, and the ratios of
training samples per second are printed.
Per-batch metrics, checkpoints and artifacts are all logged in the tracked runs, exactly
as `mlexp train` does. Also printed: the time from the end of training to the server
holding everything (the final checkpoint, summaries and status). Target: ratio >= 0.99.

    python benchmarks/tracking_overhead.py [--rounds 3] [--epochs 2] [--server-nice 19]

The server runs on the same 2 cores as the training. Its own work (receiving ~180 MB of
checkpoints per epoch here) is not the tracker's cost, and a team's server runs on another
machine: by default it runs at nice 19, so it only gets CPU time the training leaves idle.
`--server-nice 0` measures the co-located server as it is.
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

from mlexp.tracking.local_server import start_local_server  # noqa: E402

# arm -> (MLEXP_OUTBOX_SYNC, MLEXP_CHECKPOINT_UPLOAD_S); None: untracked
ARMS = {"untracked": None, "outbox NORMAL": ("NORMAL", "60"), "outbox FULL": ("FULL", "60"),
        "every checkpoint": ("NORMAL", "0")}
TRACKED = [arm for arm, setting in ARMS.items() if setting is not None]


def train_throughput(arm: str, uri: str, epochs: int) -> tuple[float, float, float]:
    """Training samples per second (inside the epochs' loops, and over the whole run by wall
    clock) and the seconds from the end of training to the server having everything."""
    from mlflow import MlflowClient

    from mlexp.config import TrainConfig
    from mlexp.training.run import run_training

    cfg = TrainConfig(backbone="resnet18_scratch", data="digits", img_size=32, batch_size=32, epochs=epochs,
                      scratch_epochs_mult=1.0, calibrate=False, tracking_uri=uri, experiment="bench-tracking")
    track = ARMS[arm] is not None
    os.environ["MLEXP_OUTBOX_SYNC"], os.environ["MLEXP_CHECKPOINT_UPLOAD_S"] = ARMS[arm] or ("NORMAL", "60")
    start = time.perf_counter()
    result = run_training(cfg, track=track)
    wall = time.perf_counter() - start
    history = result.history
    samples = sum(history.column("samples"))
    seconds = sum(history.column("epoch/time_s"))
    if track:
        run = MlflowClient(uri).get_run(result.run_id)
        assert run.info.status == "FINISHED"
    return samples / seconds, samples / wall, result.delivered_s or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--server-nice", type=int, default=19)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, "
          f"server at nice {args.server_nice}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLEXP_OUTBOX_DIR"] = str(Path(tmp) / "outbox")
        server, uri = start_local_server(Path(tmp), nice=args.server_nice)
        try:
            train_throughput("untracked", uri, 1)  # warm-up: imports, allocator, data
            rates: dict[str, list[tuple[float, float, float]]] = {arm: [] for arm in ARMS}
            for round_index in range(args.rounds):
                # rotate the order so drift on a shared machine hits every arm alike
                order = list(ARMS)[round_index % len(ARMS):] + list(ARMS)[:round_index % len(ARMS)]
                for arm in order:
                    loop_rate, wall_rate, delivered = train_throughput(arm, uri, args.epochs)
                    rates[arm].append((loop_rate, wall_rate, delivered))
                    print(f"round {round_index + 1}: {arm:<16} {loop_rate:8.1f} samples/s in the loop, "
                          f"{wall_rate:8.1f} over the whole run, delivered {delivered:.2f} s after training",
                          flush=True)
        finally:
            server.terminate()
    for index, what in ((0, "training loop"), (1, "whole run, wall clock (build, eval, checkpoints)")):
        off = statistics.median(r[index] for r in rates["untracked"])
        for arm in TRACKED:
            on = statistics.median(r[index] for r in rates[arm])
            print(f"{what}: median samples/s {arm} {on:.1f}, untracked {off:.1f}, ratio {on / off:.3f}")
    for arm in TRACKED:
        print(f"end of training -> server has everything ({arm}): median "
              f"{statistics.median(r[2] for r in rates[arm]):.2f} s")
    print("target: training-loop ratio >= 0.99")


if __name__ == "__main__":
    main()
