"""Per-batch logging cost: mlexp's tracker against its peers, side by side, one live server.

Each variant logs three metrics per step (what `mlexp train` logs per batch) to one local
`mlflow server` (at nice 19: a team's server runs on another machine): untracked, mlexp
(`RunTracker`), MLflow `log_metrics` synchronous and `synchronous=False`, Accelerate's
MLflowTracker, and W&B's client in offline mode (its own core process, no server; install
the `bench` extra). Three regimes of step:

- gpu10, gpu2: the host thread of a GPU training loop waits 10 ms / 2 ms for the device
  with the GIL released (a sleep);
- cpu: a real resnet18 training step (32 px, batch 32, digits) on this machine's CPU.

Every round runs every variant once, in a rotated order (drift on a shared machine hits
them alike); a variant's figure is the median over rounds of its per-round ratio
(untracked time / its time) with the rounds' spread. Also per variant: the log call's
latency (p50, p99, max), the training thread's longest stall (an iteration's time beyond
its step; the untracked row is the machine's own noise), and whether every point reached
the server. Then mlexp alone: 10,000 log calls with the server up and 10,000 with it down
(restarted afterwards: every point must arrive).

    python benchmarks/per_batch_logging.py [--rounds 5] [--regimes gpu10,gpu2,cpu] [--calls 10000] [--cpu-steps 60]
        [--variants mlexp,wandb offline]

Targets: gpu10 >= 0.995, gpu2 >= 0.98, cpu >= 0.99 (median ratios); log call p99 < 50 us
and no stall over 5 ms, server up and down.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from mlexp.tracking.local_server import start_local_server, stop_local_server  # noqa: E402

EXPERIMENT = "bench-per-batch"
STEPS = {"gpu10": 300, "gpu2": 1000, "cpu": 60}  # steps per variant and round (~3, 2 and 8 s here)
WARM_STEPS = 3  # logged but not timed: first-call setup (connections, lazy imports)


# --- the variants: start a run, log a step's metrics, end it (returns the MLflow run id) ---------
class Untracked:
    def start(self, uri: str, name: str) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def end(self) -> str | None:
        return None


class Mlexp(Untracked):
    def start(self, uri, name):
        from mlexp.tracking import open_run

        self.tracker = open_run(uri, EXPERIMENT, name)

    def log(self, metrics, step):
        self.tracker.log_metrics(metrics, step)

    def end(self):
        delivery = self.tracker.finish("FINISHED")
        assert delivery.complete, delivery.describe()
        return self.tracker.run_id


class MlflowFluent(Untracked):
    def __init__(self, synchronous: bool):
        self.synchronous = synchronous

    def start(self, uri, name):
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(EXPERIMENT)
        self.run_id = mlflow.start_run(run_name=name).info.run_id

    def log(self, metrics, step):
        import mlflow

        mlflow.log_metrics(metrics, step=step, synchronous=self.synchronous)

    def end(self):
        import mlflow

        mlflow.end_run()  # the asynchronous queue is drained here
        return self.run_id


class AccelerateMlflow(Untracked):
    def start(self, uri, name):
        import mlflow
        from accelerate import PartialState
        from accelerate.tracking import MLflowTracker

        PartialState()  # the tracker logs from the main process only
        mlflow.set_tracking_uri(uri)
        self.tracker = MLflowTracker(experiment_name=EXPERIMENT, run_name=name)
        self.tracker.start()  # what Accelerator.init_trackers does
        self.run_id = mlflow.active_run().info.run_id

    def log(self, metrics, step):
        self.tracker.log(metrics, step=step)

    def end(self):
        self.tracker.finish()
        return self.run_id


class WandbOffline(Untracked):
    def __init__(self, folder: Path):
        self.folder = folder

    def start(self, uri, name):
        import wandb

        self.run = wandb.init(mode="offline", dir=str(self.folder), project=EXPERIMENT, name=name)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def end(self):
        self.run.finish()
        return None  # offline: W&B's own files, no server to check


def variants(folder: Path) -> dict[str, Untracked]:
    found = {"untracked": Untracked(), "mlexp": Mlexp(), "mlflow sync": MlflowFluent(True),
             "mlflow async": MlflowFluent(False), "accelerate mlflow": AccelerateMlflow()}
    try:
        import wandb  # noqa: F401

        found["wandb offline"] = WandbOffline(folder)
    except ImportError:
        print("W&B left out: `pip install -e .[bench]` installs its client")
    return found


# --- the steps ----------------------------------------------------------------------------------
def sleep_step(seconds: float):
    return lambda: time.sleep(seconds), seconds


def cpu_step():
    """One real optimizer step of resnet18 on 32 px digits; its own median time is the step."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torchvision.models import resnet18

    digits = load_digits()
    images = torch.tensor(digits.images[:32], dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1) / 16
    images = F.interpolate(images, size=32, mode="bilinear")
    labels = torch.tensor(digits.target[:32])
    model = resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(5):
        step()
    return step, (time.perf_counter() - started) / 5


def timed_loop(variant: Untracked, step, step_s: float, steps: int) -> tuple[float, list[int], float]:
    """(seconds for the timed steps, each log call's ns, the longest iteration beyond step_s)."""
    for warm in range(WARM_STEPS):
        step()
        variant.log({"batch/loss": 1.0, "batch/lr": 0.1, "batch/samples_per_s": 100.0}, warm)
    calls, stall = [], 0.0
    started = previous = time.perf_counter()
    for index in range(WARM_STEPS, WARM_STEPS + steps):
        step()
        metrics = {"batch/loss": 1.0 / (index + 1), "batch/lr": 0.1, "batch/samples_per_s": 100.0 + index}
        before = time.perf_counter_ns()
        variant.log(metrics, index)
        calls.append(time.perf_counter_ns() - before)
        now = time.perf_counter()
        stall = max(stall, now - previous - step_s)
        previous = now
    return time.perf_counter() - started, calls, stall


def every_point_arrived(uri: str, run_id: str | None, points: int) -> str:
    if run_id is None:
        return "n/a"
    from mlflow import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, "batch/loss")
    return "yes" if sorted(m.step for m in history) == list(range(points)) else f"NO ({len(history)}/{points})"


def latency(calls: list[int]) -> str:
    ordered = sorted(calls)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return f"p50 {pick(0.5):8.1f} us  p99 {pick(0.99):8.1f} us  max {ordered[-1] / 1000:8.1f} us"


def run_regime(regime: str, found: dict[str, Untracked], uri: str, rounds: int, steps: int) -> None:
    step, step_s = cpu_step() if regime == "cpu" else sleep_step(int(regime[3:]) / 1000)
    print(f"\n== {regime}: {steps} steps of {step_s * 1000:.1f} ms per variant and round, {rounds} rounds", flush=True)
    names = list(found)
    seconds = {name: [] for name in names}
    calls = {name: [] for name in names}
    stalls = {name: 0.0 for name in names}
    arrived = {name: "yes" for name in names}
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            found[name].start(uri, f"{regime}-{name}-{round_index}")
            took, logged, stall = timed_loop(found[name], step, step_s, steps)
            ended = time.perf_counter()
            run_id = found[name].end()
            end_s = time.perf_counter() - ended
            seconds[name].append(took)
            calls[name] += logged
            stalls[name] = max(stalls[name], stall)
            check = every_point_arrived(uri, run_id, WARM_STEPS + steps)
            arrived[name] = check if check != "yes" else arrived[name]
            print(f"  round {round_index + 1} {name:<18} {took:7.2f} s  end {end_s:5.2f} s  points: {check}",
                  flush=True)
    print(f"{'variant':<18} {'median ratio':>12} {'spread':>15}   log call latency{'':>40} longest stall  all points")
    for name in names:
        ratios = [base / mine for base, mine in zip(seconds["untracked"], seconds[name])]
        print(f"{name:<18} {statistics.median(ratios):12.4f} {min(ratios):7.4f}-{max(ratios):.4f}   "
              f"{latency(calls[name]) if name != 'untracked' else '':<62} {stalls[name] * 1000:8.2f} ms  "
              f"{arrived[name]}", flush=True)


class TrainingThreadGc:
    """The longest garbage collection that ran on this (the training) thread: a stall that is
    the process's, whoever allocated last."""

    def __init__(self):
        self.longest_ms, self._started, self._thread = 0.0, 0.0, threading.get_ident()

    def __call__(self, phase: str, info: dict) -> None:
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._started) * 1000)


def latency_up_and_down(root: Path, server, uri: str, calls: int):
    """mlexp alone, `calls` log calls 1 ms apart, with the server up and then with it stopped;
    first the same loop untracked (the machine's own stalls)."""
    from mlexp.tracking import open_run

    step, step_s = sleep_step(0.001)
    port = int(uri.rsplit(":", 1)[1])
    _, _, stall = timed_loop(Untracked(), step, step_s, calls)
    print(f"untracked          : {calls} steps{'':>66}longest stall {stall * 1000:.2f} ms", flush=True)
    for state in ("up", "down"):
        tracker = open_run(uri, EXPERIMENT, f"latency-server-{state}")
        if state == "down":
            stop_local_server(server)
        mlexp = Mlexp()
        mlexp.tracker = tracker
        collections = TrainingThreadGc()
        gc.callbacks.append(collections)
        _, logged, stall = timed_loop(mlexp, step, step_s, calls)
        gc.callbacks.remove(collections)
        if state == "down":
            server, _ = start_local_server(root, port=port, nice=19)
        arrived = (mlexp.end(), every_point_arrived(uri, tracker.run_id, WARM_STEPS + calls))[1]
        print(f"mlexp, server {state:<4}: {calls} calls  {latency(logged)}  longest stall {stall * 1000:.2f} ms "
              f"(longest GC on the thread {collections.longest_ms:.2f} ms)  all points: {arrived}", flush=True)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--regimes", default="gpu10,gpu2,cpu")
    parser.add_argument("--calls", type=int, default=10_000, help="log calls of the latency run (server up, then down)")
    parser.add_argument("--cpu-steps", type=int, default=STEPS["cpu"],
                        help="resnet18 steps per variant and round (longer rounds average this machine's noise)")
    parser.add_argument("--variants", default="", help="a comma-separated subset (untracked always runs)")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; mlflow server at nice 19")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLEXP_OUTBOX_DIR"] = str(Path(tmp) / "outbox")
        server, uri = start_local_server(Path(tmp) / "server", nice=19)
        try:
            found = variants(Path(tmp))
            if args.variants:
                found = {name: found[name] for name in found if name == "untracked" or name in args.variants.split(",")}
            for regime in filter(None, args.regimes.split(",")):
                run_regime(regime, found, uri, args.rounds, args.cpu_steps if regime == "cpu" else STEPS[regime])
            if args.calls:
                print()
                server = latency_up_and_down(Path(tmp) / "server", server, uri, args.calls)
        finally:
            stop_local_server(server)


if __name__ == "__main__":
    main()
