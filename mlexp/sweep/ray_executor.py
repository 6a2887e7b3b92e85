"""The Ray executor: each configuration a Ray task, so a sweep spreads over every node of a
Ray cluster (on Kubernetes, Slurm or plain machines: `ray start --head` on one, `ray start
--address HEAD:6379` on the others).

A task asks for the resources of one child (--cpus-per-run, --gpus-per-run) and runs the
same `run_job` as the local executor: claim the configuration on the tracking server, then
`python -m mlexp train ... --run-id RUN` in a child process of the worker, which the kernel
kills if the worker dies. When a worker dies (node lost, process killed) or the training
process is killed, Ray runs the task again; it takes the next claim attempt and its
training resumes the same MLflow run from its last checkpoint, never a second run.
Ray is optional: `pip install 'mlexp[ray]'`.
"""

# Imported where used: `ray` (the ray extra), only with `--executor ray`.
from __future__ import annotations

import signal
import socket
import time

from mlexp.errors import MlexpError
from mlexp.sweep.local_executor import ChildJob, ChildOutcome, check_counts, end_untrained, run_job
from mlexp.tracking import claims, server

TASK_RETRIES = 3  # runs of one configuration after its worker or training process was killed


class ChildKilled(Exception):
    """The training process died from a signal (the OOM killer, kill -9): Ray runs the task again."""


def train_task(job: ChildJob, threads: int) -> ChildOutcome:
    """One configuration, on whichever worker Ray chose."""
    outcome = run_job(job, threads, on_parent_death=signal.SIGKILL, settle_kills=False)
    if outcome.exit_code is not None and outcome.exit_code < 0:
        raise ChildKilled(f"training process of {job.run_name} killed by {signal.Signals(-outcome.exit_code).name}")
    return outcome


def import_ray():
    try:
        import ray
    except ImportError:
        raise MlexpError("--executor ray needs Ray: pip install 'mlexp[ray]' (or pip install ray)") from None
    return ray


def check_address(address: str) -> None:
    """An unreachable HOST:PORT is one line now, not a long wait inside Ray."""
    host, _, port = address.rpartition(":")
    if address == "auto" or address.startswith("ray://") or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise MlexpError(f"cannot reach the Ray cluster at {address} ({error.strerror or error}); start it with "
                         "`ray start --head`, or leave --ray-address out for a local Ray instance") from None


class RayExecutor:
    def __init__(self, address: str | None, parallel: int | None, gpus_per_run: int | None,
                 cpus_per_run: int | None, task=None, on_failure=None):
        """`task(job, threads)`: what a Ray task runs (a sweep's: `train_task`); `on_failure(job,
        error, seconds)`: its outcome once Ray gave up on it (a sweep's: `failed_task`)."""
        check_counts(parallel, gpus_per_run, cpus_per_run)
        ray = import_ray()
        if address:
            check_address(address)
        try:
            if address:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise MlexpError(f"cannot connect to Ray at {address or 'a new local instance'}: "
                             f"{str(error).strip().splitlines()[0]}") from None
        self.ray = ray
        resources = ray.cluster_resources()
        self.gpus_per_run = gpus_per_run if gpus_per_run is not None else (1 if resources.get("GPU") else 0)
        self.cpus_per_run = cpus_per_run or 1
        if self.gpus_per_run > resources.get("GPU", 0):
            self.close()
            raise MlexpError(f"--gpus-per-run {self.gpus_per_run}: the Ray cluster has "
                             f"{int(resources.get('GPU', 0)) or 'no'} GPU(s)")
        slots = (resources.get("GPU", 0) // self.gpus_per_run if self.gpus_per_run
                 else resources.get("CPU", 1) // self.cpus_per_run)
        self.parallel = parallel or max(1, int(slots))
        self.on_failure = on_failure or failed_task
        self.task = ray.remote(task or train_task).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                                   max_retries=TASK_RETRIES, retry_exceptions=[ChildKilled])
        self.running: dict[int, tuple] = {}  # index -> (object ref, job, submitted at)
        self.nodes = len([node for node in ray.nodes() if node.get("Alive")])

    def describe(self) -> str:
        each = f"{self.gpus_per_run} GPU(s)" if self.gpus_per_run else f"{self.cpus_per_run} CPU(s)"
        return f"as Ray tasks on {self.nodes} node(s), up to {self.parallel} at a time, {each} each"

    def has_room(self) -> bool:
        return len(self.running) < self.parallel

    def start(self, job: ChildJob) -> str:
        self.running[job.index] = (self.task.remote(job, self.cpus_per_run), job, time.monotonic())
        return "a Ray task: it claims the configuration where it runs"

    def poll(self, timeout: float = 0) -> list[ChildOutcome]:
        refs = {ref: index for index, (ref, _, _) in self.running.items()}
        if not refs:
            return []
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        outcomes = []
        for ref in ready:
            index = refs[ref]
            _, job, submitted = self.running.pop(index)
            try:
                outcomes.append(self.ray.get(ref))
            except self.ray.exceptions.TaskCancelledError:
                outcomes.append(ChildOutcome(index, "KILLED", seconds=time.monotonic() - submitted))
            except Exception as error:  # noqa: BLE001 - retries spent: the configuration failed
                outcomes.append(self.on_failure(job, error, time.monotonic() - submitted))
        return outcomes

    def stop(self) -> list[ChildOutcome]:
        """Cancel every task: each stops its training, which ends its run KILLED."""
        for ref, _, _ in self.running.values():
            self.ray.cancel(ref, force=False)
        deadline = time.monotonic() + 90
        outcomes = []
        while self.running and time.monotonic() < deadline:
            outcomes += self.poll(timeout=1.0)
        return outcomes

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def failed_task(job: ChildJob, error: BaseException, seconds: float) -> ChildOutcome:
    """A task Ray gave up on: its run, if it has one, ends FAILED with the reason."""

    message = " ".join(str(error).split())[:300] or type(error).__name__
    run_id = None
    try:
        client = server.client_for(job.tracking_uri)
        run = claims.read_state(client, job.experiment_id, job.parent_run_id).children.get(job.config_hash)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status == "RUNNING":
                end_untrained(job, run_id, "FAILED", message)
    except Exception:  # noqa: BLE001 - the run then shows as lost; `mlexp reap` ends it
        pass
    return ChildOutcome(job.index, "FAILED", run_id, None, seconds, None, message)
