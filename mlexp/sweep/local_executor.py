"""A sweep's children: each configuration trains in its own `mlexp train` process.

A child is the command a user would type, `python -m mlexp train <the sweep's training
options> --backbone B --init I --strategy S --seed N [--fold F] --run-id RUN` (under
`torchrun --nproc_per_node K` with --gpus-per-run K), so Accelerate and torchrun behave
exactly as for a single run, and a crash or a leak ends that child only. Its output goes
to its own log file; its exit status and its run's status are what the sweep reports.

Before a child starts, its configuration is claimed on the tracking server (`claims`): a
launcher that loses the claim leaves that configuration to whoever holds it. The same
`run_job` serves the local executor (below) and Ray tasks (`ray_executor`).
"""

# Imported where used: `torch` (about 2 s), only to count GPUs when a sweep starts: `mlexp --help`
# imports this module.
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlexp.errors import MlexpError
from mlexp.option_values import best_key
from mlexp.tracking import claims, end_run, server
from mlexp.tracking.outbox import TERMINAL, Outbox
from mlexp.tracking.sync import sync_outbox

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_WAIT_S = 60.0  # Ctrl-C: how long the children get to end their runs KILLED
LEFTOVER_STALL_S = 15.0  # a dead child's unsent records: give up when nothing moves for this long


@dataclass
class ChildJob:
    """One configuration to train, as a launcher hands it to an executor (picklable for Ray)."""

    index: int
    total: int
    label: str
    run_name: str
    config_hash: str
    train_args: list[str]  # the `mlexp train` options, without --run-id
    tracking_uri: str
    experiment_id: str | None
    parent_run_id: str
    owner: str
    log_path: str
    offline: bool = False
    retry_failed: bool = False
    run_id: str | None = None  # offline sweeps: the child's local run, created by the launcher
    env: dict[str, str] = field(default_factory=dict)
    gpus_per_run: int = 0
    cwd: str = field(default_factory=os.getcwd)  # the launcher's: relative paths (--data) mean the same


@dataclass
class ChildOutcome:
    index: int
    status: str  # FINISHED, FAILED, KILLED, or ELSEWHERE: another launcher holds the configuration
    run_id: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    best: tuple[str, float] | None = None  # the run's best validation score, named (best_score)
    message: str = ""


def forwarded_env(*prefixes: str) -> dict[str, str]:
    """What a child needs from the launcher's environment wherever it runs (a Ray worker
    starts with the cluster's): mlexp's, MLflow's and Hugging Face's settings, and `prefixes`."""
    wanted = ("MLEXP_", "MLFLOW_", "HF_", "TIMM_", "TORCH_HOME", *prefixes)
    return {k: v for k, v in os.environ.items() if k.startswith(wanted)}


def best_score(metrics: dict[str, float], params: dict[str, str] | None = None) -> tuple[str, float] | None:
    """A finished run's best validation score and its name: val acc, a detector's val mAP, or
    (a task of the user's own) the metric the run chose its best epoch by ("val r2")."""
    for key, name in (("best/val_acc", "val acc"), ("best/val_map", "val mAP")):
        if key in metrics:
            return name, metrics[key]
    chosen = (params or {}).get("best_metric") or ""
    if chosen.startswith("val/") and best_key(chosen) in metrics:
        return chosen.replace("/", " "), metrics[best_key(chosen)]
    return None


# --- one job, wherever it runs ----------------------------------------------------------------
def claim_run(job: ChildJob) -> str | None:
    """Claim the configuration and find or create its run: the run id, None if another has it."""
    if job.offline:
        return job.run_id
    client = server.client_for(job.tracking_uri)
    if claims.claim(client, job.experiment_id, job.parent_run_id, job.config_hash, job.owner,
                    job.retry_failed) is None:
        return None
    run_id, _ = claims.child_run(client, job.experiment_id, job.parent_run_id, job.config_hash, job.run_name,
                                 {"mlexp.sweep_index": str(job.index)})
    return run_id


def command(job: ChildJob, run_id: str) -> list[str]:
    train = ["-m", "mlexp", "train", *job.train_args, "--run-id", run_id]
    if job.gpus_per_run > 1:  # one DDP training on K GPUs, as a user would start it
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={job.gpus_per_run}", *train]
    return [sys.executable, *train]


def child_env(job: ChildJob, threads: int, gpus: list[str] | None) -> dict[str, str]:
    env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1"}
    if not job.offline:  # the sweep's store, by its absolute path (a --tracking-uri given is passed as given)
        env["MLFLOW_TRACKING_URI"] = job.tracking_uri
    for name in THREAD_VARIABLES:  # N children never oversubscribe the cores
        env[name] = str(threads)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def die_with_parent(signum: int):
    """A child that outlives its launcher would train unseen: the kernel sends it `signum`
    when the launcher dies, however it dies (Linux; elsewhere a no-op)."""
    def set_signal() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    return set_signal if sys.platform.startswith("linux") else None


def start_process(job: ChildJob, run_id: str, threads: int, gpus: list[str] | None,
                  on_parent_death: int) -> subprocess.Popen:
    Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "ab") as log:
        log.write(f"$ {' '.join(command(job, run_id))}\n".encode())
        log.flush()
        # Its own session: Ctrl-C reaches the launcher alone, which then stops each child once.
        return subprocess.Popen(command(job, run_id), stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(job, threads, gpus), start_new_session=True,
                                cwd=job.cwd if os.path.isdir(job.cwd) else None,
                                preexec_fn=die_with_parent(on_parent_death))


def settle(job: ChildJob, run_id: str, exit_code: int, seconds: float) -> ChildOutcome:
    """The child's outcome, from its run (what the server or its outbox says). A child that
    died before its training could end its run (a user error, a crash at start, a kill)
    has its run ended FAILED here, with the reason, never left RUNNING."""
    message = log_error(job.log_path, exit_code)
    status, best, waiting = run_result(job, run_id)
    if status in (None, "RUNNING"):
        status = "FAILED"
        end_untrained(job, run_id, status, message or f"exit status {exit_code}")
    elif exit_code != 0 and status == "FINISHED":
        status = "FAILED"  # never reported as a success when the process said otherwise
    if status == "FINISHED":  # what is said beside FINISHED: only whether the server knows it yet
        message = (f"the server does not have it all yet: its last records wait in its outbox; "
                   f"`mlexp sync --run {run_id}` sends them") if waiting and not job.offline else ""
    return ChildOutcome(job.index, status, run_id, exit_code, seconds, best, message)


def run_result(job: ChildJob, run_id: str) -> tuple[str | None, tuple[str, float] | None, bool]:
    """How the child's run ended, its best validation score (best_score), and whether its outbox still
    holds records the server lacks (the server's own answer, where it can give one)."""
    box = Outbox.find(run_id)
    local = box.info().status if box is not None else None
    if job.offline:
        return local, None, still_waiting(run_id)
    try:
        run = server.client_for(job.tracking_uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - the server is away: the outbox knows how the run ended
        return local, None, still_waiting(run_id)
    if local in TERMINAL and run.info.status == "RUNNING":
        run = deliver_leftovers(box, run_id, job.tracking_uri) or run
    status = local if local in TERMINAL and run.info.status == "RUNNING" else run.info.status
    return status, best_score(run.data.metrics, run.data.params), still_waiting(run_id)


def still_waiting(run_id: str) -> bool:
    """Whether the run's outbox on this machine still holds records (a delivered one is removed)."""
    box = Outbox.find(run_id)
    return box is not None and not box.pending().empty


def deliver_leftovers(box, run_id: str, tracking_uri: str):
    """A child whose time to send its last records ran out (a kill, or Ctrl-C's few seconds to
    end its run KILLED) left them in its outbox: send them now, so the server, not only this
    launcher, says how the run ended. The run as the server then has it (None if unreachable)."""

    try:
        sync_outbox(box, None, False, stall=LEFTOVER_STALL_S)
        return server.client_for(tracking_uri).get_run(run_id)
    except Exception as error:  # noqa: BLE001 - the outbox keeps them for `mlexp sync`
        print(f"  run {run_id}: its last records wait in its outbox ({server.first_line(error)}); "
              "`mlexp sync --all` sends them", flush=True)
        return None


def end_untrained(job: ChildJob, run_id: str, status: str, message: str) -> None:
    try:
        end_run(job.tracking_uri, run_id, status, message, offline=job.offline)
    except Exception as error:  # noqa: BLE001 - the run then shows as lost; `mlexp reap` ends it
        print(f"  could not record how run {run_id} ended ({server.first_line(error)})", flush=True)


def log_error(log_path: str, exit_code: int) -> str:
    """Why a child failed, in one line: its `mlexp: error:` line, else its last line."""
    if exit_code == 0:
        return ""
    if exit_code < 0:
        return f"killed by {signal.Signals(-exit_code).name}"
    try:
        lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("mlexp: error:")]
    return (errors or lines or [""])[-1][:300]


def run_job(job: ChildJob, threads: int, on_parent_death: int = signal.SIGKILL,
            settle_kills: bool = True) -> ChildOutcome:
    """Claim, train and settle one configuration in this process's own child (a Ray task).
    `settle_kills=False`: a training killed by a signal is left as it is (RUNNING), for a
    retry to resume; the caller sees its negative exit code."""
    started = time.monotonic()
    run_id = claim_run(job)
    if run_id is None:
        return finished_by_own_attempt(job) or ChildOutcome(job.index, "ELSEWHERE")
    process = start_process(job, run_id, threads, None, on_parent_death)
    try:
        exit_code = process.wait()
    except BaseException:  # cancelled (Ctrl-C in the launcher): the child ends its run KILLED
        stop_process(process)
        raise
    if exit_code < 0 and not settle_kills:
        return ChildOutcome(job.index, "KILLED", run_id, exit_code, time.monotonic() - started)
    return settle(job, run_id, exit_code, time.monotonic() - started)


def finished_by_own_attempt(job: ChildJob) -> ChildOutcome | None:
    """A retry of a task whose training had FINISHED before its worker died: that outcome."""
    client = server.client_for(job.tracking_uri)
    state = claims.read_state(client, job.experiment_id, job.parent_run_id)
    attempt, run = state.claims.get(job.config_hash), state.children.get(job.config_hash)
    if run is None or attempt is None or attempt.owner != job.owner or run.info.status != "FINISHED":
        return None
    return ChildOutcome(job.index, "FINISHED", run.info.run_id, 0, 0.0, best_score(run.data.metrics, run.data.params))


def stop_process(process: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM once (the training ends its run KILLED), SIGKILL if it does not end in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- the local executor: N children at once on this machine ----------------------------------
@dataclass
class Running:
    job: ChildJob
    run_id: str
    process: subprocess.Popen
    gpus: list[str]
    started: float


class LocalExecutor:
    """Up to `parallel` children at once; each gets `gpus_per_run` of this machine's GPUs
    (CUDA_VISIBLE_DEVICES) or, on CPU, `threads` threads."""

    def __init__(self, parallel: int, gpus_per_run: int, gpu_ids: list[str], threads: int):
        self.parallel = parallel
        self.gpus_per_run = gpus_per_run
        self.free_gpus = list(gpu_ids)
        self.threads = threads
        self.running: dict[int, Running] = {}

    def describe(self) -> str:
        where = (f"{self.gpus_per_run} GPU(s) each" if self.gpus_per_run else f"{self.threads} CPU thread(s) each")
        return f"{self.parallel} at a time on this machine, {where}"

    def has_room(self) -> bool:
        return len(self.running) < self.parallel

    def start(self, job: ChildJob) -> str | None:
        """Claim and start one child: where it runs (its run, its GPUs or threads), or None
        when another launcher holds its configuration."""
        run_id = claim_run(job)
        if run_id is None:
            return None
        gpus = [self.free_gpus.pop(0) for _ in range(self.gpus_per_run)]
        process = start_process(job, run_id, self.threads, gpus if self.gpus_per_run else None, signal.SIGTERM)
        self.running[job.index] = Running(job, run_id, process, gpus, time.monotonic())
        return f"run {run_id}, " + (f"GPU {','.join(gpus)}" if gpus else f"{self.threads} thread(s)")

    def poll(self) -> list[ChildOutcome]:
        outcomes = []
        for index, child in list(self.running.items()):
            exit_code = child.process.poll()
            if exit_code is None:
                continue
            del self.running[index]
            self.free_gpus.extend(child.gpus)
            outcomes.append(settle(child.job, child.run_id, exit_code, time.monotonic() - child.started))
        return outcomes

    def stop(self) -> list[ChildOutcome]:
        """Stop every running child (each ends its run KILLED); their outcomes."""
        for child in self.running.values():
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.running.values():
            stop_process(child.process)
        return self.poll()

    def close(self) -> None:
        pass


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them (honouring the launcher's own)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    return given[:count] if given else [str(index) for index in range(count)]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_local_executor(parallel: int | None, gpus_per_run: int | None, cpus_per_run: int | None) -> LocalExecutor:
    """Check the machine can run what was asked (one clear line if not), then the executor.

    GPUs: N defaults to GPUs // K, each child on its own K GPUs. CPU: N defaults to 1, and
    each child gets cores // N threads, so N children never oversubscribe the cores."""

    check_counts(parallel, gpus_per_run, cpus_per_run)
    gpus = visible_gpus() if gpus_per_run != 0 else []
    per_run = 1 if gpus_per_run is None and gpus else (gpus_per_run or 0)
    if per_run > len(gpus):
        raise MlexpError(f"--gpus-per-run {per_run}: this machine has {len(gpus) or 'no'} GPU(s)"
                         + ("" if gpus else "; leave it out to train on CPU"))
    if per_run:
        parallel = parallel or len(gpus) // per_run
        if parallel * per_run > len(gpus):
            raise MlexpError(f"--parallel {parallel} x --gpus-per-run {per_run} needs {parallel * per_run} GPUs; "
                             f"this machine has {len(gpus)}")
    parallel = parallel or 1
    threads = cpus_per_run or max(1, cpu_cores() // parallel)
    return LocalExecutor(parallel, per_run, gpus, threads)


def check_counts(parallel: int | None, gpus_per_run: int | None, cpus_per_run: int | None) -> None:
    if parallel is not None and parallel < 1:
        raise MlexpError(f"--parallel must be at least 1, got {parallel}")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise MlexpError(f"--gpus-per-run must not be negative, got {gpus_per_run}")
    if cpus_per_run is not None and cpus_per_run < 1:
        raise MlexpError(f"--cpus-per-run must be at least 1, got {cpus_per_run}")
