"""RunTracker: one run's tracker, every call a durable write to its outbox.

Metric points are appended to a buffer that a background thread group-commits to the
outbox (mlexp.tracking.writer: the training thread never waits on SQLite for them); every
other call returns once the outbox has committed the write, after the points logged
before it. The sender (online) or `mlexp sync` (offline, or whatever an ended process
left) delivers it.
`finish` records the final status, gives the sender a bounded grace period, and says
honestly what the server has and what still waits.
"""

# Imported where used: `mlflow` (about 1.4 s), because `mlexp --help`, the option checks and
# their one-line errors import this module and come before it.
from __future__ import annotations

import gc
import os
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from mlexp.config import DEFAULT_EXPERIMENT
from mlexp.errors import MlexpError
from mlexp.tracking import server
from mlexp.tracking.outbox import TERMINAL, Outbox, new_local_id, now_ms, outbox_root, outbox_unwritable
from mlexp.tracking.outbox_info import Pending
from mlexp.tracking.sender import Sender, lower_this_threads_priority, seconds_from_env
from mlexp.tracking.writer import PointWriter


def grace_s() -> float:
    """How long a finished run waits for its sender before leaving the rest to `mlexp sync`."""
    return seconds_from_env("MLEXP_GRACE_S", 30.0)


def heartbeat_s() -> float:
    return seconds_from_env("MLEXP_HEARTBEAT_S", 30.0)


# While a run is tracked: how long a background thread of the tracker (writer, sender lanes,
# heartbeat) may hold the GIL while the training thread waits for it. CPython's default is
# 5 ms, half a GPU step (benchmarks/per_batch_logging.py, 3 rounds: at 2 ms steps the ratio
# to untracked went 0.993 -> 0.997 and the longest stall 10.6 -> 3.7 ms; at 10 ms steps 0.996
# -> 0.9997 and 5.3 -> 3.3 ms). Every thread of the process switches this often then;
# the training thread's own work (torch kernels, the GPU wait) runs without the GIL.
SWITCH_INTERVAL_S = 0.0005


def offline_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("MLEXP_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Delivery:
    """What a run's end left: everything on the server, or what still waits and where."""

    run_id: str
    status: str | None
    pending: Pending
    outbox: Path
    offline: bool
    tracking_uri: str | None

    @property
    def complete(self) -> bool:
        return not self.offline and self.pending.empty and not self.pending.rejected

    def describe(self) -> str:
        if self.complete:
            return f"the tracking server ({self.tracking_uri}) has everything"
        if self.offline:
            return (f"recorded offline in {self.outbox}; send it with "
                    f"`mlexp sync --run {self.run_id} --to TRACKING_URI`")
        return (f"the tracking server does not have everything yet: {self.pending.describe()} wait in "
                f"{self.outbox}; `mlexp sync --run {self.run_id}` sends them once {self.tracking_uri} answers")


class RunTracker:
    """The Tracker protocol over an outbox (see mlexp/tracking/__init__.py)."""

    def __init__(self, outbox: Outbox, client=None, resume_steps: dict[str, int] | None = None,
                 heartbeat: bool = True, adopted: bool = False):
        self.outbox = outbox
        self.adopted = adopted  # a run created before this process (by `mlflow run`, a sweep, a resume)
        info = outbox.info()
        self.local_id = info.local_id
        self.run_id: str = info.run_id or info.local_id
        self.tracking_uri = info.tracking_uri
        self.offline = client is None
        self.client = client
        # Highest step the run already holds per metric (resume): points at or below are not logged again.
        self._resume_steps = dict(resume_steps or {})
        self.sender = Sender(outbox, client, info.run_id, training=True).start() if client is not None else None
        self.points = PointWriter(outbox, self._resume_steps)
        # What is alive when a run starts (torch's, timm's and MLflow's modules: ~500k objects)
        # leaves the collector's reach: a full collection, which holds the GIL and may start on
        # one of the tracker's threads while the training thread waits, then scans only what
        # the run creates (measured with torch and MLflow loaded: a 208 ms collection on the sender's
        # thread before, none over 5 ms after; benchmarks/per_batch_logging.py's longest stall).
        self._froze = not gc.get_freeze_count()  # an enclosing run (a study's trials) froze them already
        if self._froze:
            gc.freeze()  # handed back when the run is closed (garbage frozen with them is collected then)
        self._switch_interval = sys.getswitchinterval()  # restored when the run is closed
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self._beats = threading.Event()
        self._beat_thread: threading.Thread | None = None
        if self.sender is not None and heartbeat:
            # Where it runs: `reap` can then say whether that process is gone.
            self.set_tags({"mlexp.heartbeat_s": f"{heartbeat_s():g}",
                           "mlexp.process": f"{socket.gethostname()}:{os.getpid()}"})
            self._beat_thread = threading.Thread(target=self._heartbeat, name="mlexp-heartbeat", daemon=True)
            self._beat_thread.start()

    # --- the protocol: metric points are buffered, everything else returns once the outbox holds
    # it (with every point logged before it: `flush`) ------------------------------------------------
    def log_params(self, params: dict[str, str]) -> None:
        self.outbox.add_texts("param", params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.outbox.add_texts("tag", tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.points.add(metrics, step)

    def flush(self) -> None:
        """Every metric point logged so far is durable in the outbox when this returns."""
        self.points.flush()

    def staging_dir(self, name: str) -> Path:
        """A folder to write an artifact into; logging it then costs no copy."""
        return self.outbox.staging_dir(name)

    def log_artifacts(self, local_dir: Path, artifact_path: str, copy: bool = False) -> None:
        """Upload a folder's files under `artifact_path`. The outbox takes the folder (moves it;
        `copy=True` for a folder the user keeps) and deletes it once the server has it."""
        if copy:
            staged = self.staging_dir(Path(local_dir).name)
            shutil.copytree(local_dir, staged, dirs_exist_ok=True)
            local_dir = staged
        self.outbox.add_upload(Path(local_dir), artifact_path)
        self._wake()

    def publish_checkpoint(self, manifest_dir: Path, artifact_path: str, epoch: int) -> None:
        """Publish a checkpoint's manifest once its files and the metrics before it are sent."""
        self.flush()
        self.outbox.add_upload(manifest_dir, artifact_path, op="manifest", after_seq=self.outbox.last_record_seq(),
                               meta={"epoch": epoch})
        self._wake()

    def log_inputs(self, splits: list[dict], model_ids: list[str] | None = None) -> None:
        """The run's data splits (mlexp.data.digests) and the logged models it used, as MLflow inputs."""
        self.outbox.add_operation("inputs", {"splits": splits, "models": model_ids or []})
        self._wake()

    def link_metrics(self, model_id: str, metrics: list, datasets: dict) -> None:
        """Link these [key, step] points to an existing logged model, once they are on the server."""
        self.flush()
        self.outbox.add_operation("link_metrics", {"model_id": model_id, "metrics": metrics, "datasets": datasets},
                                  after_seq=self.outbox.last_record_seq())
        self._wake()

    def log_model(self, model_dir: Path, name: str, step: int, meta: dict) -> None:
        """A saved MLflow model folder as a logged model of this run at `step`, once the metrics
        logged before it are on the server (they are linked to it)."""
        self.flush()
        self.outbox.add_upload(model_dir, f"logged-models/{name}", op="logged_model",
                               after_seq=self.outbox.last_record_seq(), meta={**meta, "name": name, "step": step})
        self._wake()

    def last_step(self, key: str) -> int:
        """The highest step this run already holds for `key` (0 for a new run)."""
        self.flush()
        return max(self._resume_steps.get(key, 0), self.outbox.max_steps().get(key, 0))

    def experiment_id(self) -> str:
        """The run's experiment on the server (online runs)."""
        return self.outbox.info().experiment_id or self.client.get_run(self.run_id).info.experiment_id

    def supersede(self, artifact_prefix: str, keep_newest: bool = False) -> None:
        """A newer upload under `artifact_prefix` replaces unsent older ones: drop them
        (`keep_newest`: the newer one is queued already)."""
        self.outbox.drop_superseded(artifact_prefix, keep_newest)

    def remember(self, key: str, value) -> None:
        """Keep a value with the run's outbox (read back by a resume on this machine), after every
        point logged before it: a checkpoint remembered for resume never outruns its metrics."""
        self.flush()
        self.outbox.put(key, value)

    def mark_running(self) -> None:
        """A resumed run is training again: RUNNING (set only now, so a failed resume changes nothing)."""
        self.outbox.set_status("RUNNING")
        self._wake()

    def finish(self, status: str, error: str | None = None, wait_s: float | None = None) -> Delivery:
        """Record the final status, give the sender up to `wait_s`, report what the server has."""
        try:
            self.points.close()
            if error:
                self.set_tags({"mlexp.error": error[:5000]})
            self.outbox.set_status(status)
        except Exception as stuck:  # noqa: BLE001 - tested below: only an outbox that cannot be written
            if not outbox_unwritable(stuck):
                raise
            return self._end_directly(error, stuck)
        return self._close(grace_s() if wait_s is None else wait_s)

    def _end_directly(self, error: str | None, stuck: BaseException) -> Delivery:
        """The outbox cannot take the final status (disk full, read-only): FAILED with the cause,
        written to the server directly, so the run is never left RUNNING with no reason given.
        What the outbox already holds stays there for `mlexp sync`."""
        delivery = self._close(0.0)
        cause = f"the outbox {self.outbox.folder} cannot be written ({stuck})"
        message = f"{error}; {cause}" if error and "disk is full" not in error else cause
        if self.client is not None and self.outbox.info().run_id:
            try:
                self.client.set_tag(self.run_id, "mlexp.error", message[:5000])
                self.client.set_terminated(self.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the server is away too: the outbox is all there is
                pass
        delivery.status = "FAILED"
        return delivery

    def abandon(self, wait_s: float = 5.0) -> Delivery:
        """Stop without a status change (a resume that never started training)."""
        return self._close(wait_s)

    # --- inside -------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.sender is not None:
            self.sender.wake()

    def _heartbeat(self) -> None:
        lower_this_threads_priority()
        period = heartbeat_s()
        told = ""
        while True:
            try:
                self.outbox.add_texts("tag", {"mlexp.heartbeat": str(now_ms())}, replace=True)
                self._wake()
            except Exception as missed:  # noqa: BLE001 - a missed beat (disk full, locked) is retried next period
                told = self._tell_server(f"its heartbeat could not be written to the outbox ({missed})", told)
            if self._beats.wait(period):
                return

    def _tell_server(self, problem: str, told: str) -> str:
        """Write `problem` straight to the server as `mlexp.last_problem` (once each), for `reap`
        to show if the run falls silent: the outbox is what failed. Returns what was told."""
        if problem == told or self.client is None or not self.outbox.info().run_id:
            return told
        try:
            self.client.set_tag(self.run_id, "mlexp.last_problem", problem[:5000])
        except Exception:  # noqa: BLE001 - the server is away too: nothing else can be told
            return told
        return problem

    def _close(self, wait_s: float) -> Delivery:
        try:
            self.points.close()  # usually done already (finish)
        except Exception:  # noqa: BLE001 - the outbox's disk refused them: finish already ended the run FAILED, saying so
            pass
        self._beats.set()
        if self._beat_thread is not None:
            self._beat_thread.join(5.0)  # no beat may land after the last drain check
        if self.sender is not None:
            try:
                self.sender.wait_drained(wait_s)
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: stop waiting; everything stays in the outbox
            self.sender.stop()
        sys.setswitchinterval(self._switch_interval)
        if self._froze:
            gc.unfreeze()
        pending = self.outbox.pending()
        delivery = Delivery(self.run_id, self.outbox.info().status, pending, self.outbox.folder, self.offline,
                            self.tracking_uri)
        if delivery.complete:
            self.outbox.remove()
        else:
            self.outbox.unlock()
            self.outbox.close()
        return delivery


# --- opening a run ------------------------------------------------------------------------------
def claim(box: Outbox) -> Outbox:
    if not box.try_lock():
        raise MlexpError(f"run {box.info().run_id or box.info().local_id} is being tracked by a live process "
                         f"(pid {box.holder_pid()}) on this machine; wait for it or stop it first")
    return box


def last_logged_steps(client, run_id: str) -> dict[str, int]:
    """The highest step logged so far for every metric of a run on the server."""
    run = client.get_run(run_id)
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics}


def merge_steps(*sources: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for steps in sources:
        for key, step in steps.items():
            merged[key] = max(step, merged.get(key, -1))
    return merged


def open_run(tracking_uri: str, experiment: str, run_name: str | None, *, run_id: str | None = None,
             resume_run_id: str | None = None, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None, offline: bool = False, heartbeat: bool = True) -> RunTracker:
    """Start, adopt or resume the run a process logs to.

    `run_id`: a run created for us (a sweep's child, the run `mlflow run` created for an entry
    point) is adopted. `resume_run_id`: continue that run; its status
    changes only when `mark_running` is called. `offline`: record everything locally.
    """
    tags = dict(tags or {})
    if offline:
        return _open_offline(experiment, run_name, run_id, resume_run_id, parent_run_id, tags)
    server.check_reachable(tracking_uri)
    client = server.client_for(tracking_uri)
    existing = resume_run_id or run_id
    if existing:
        box = claim(Outbox.find(existing) or Outbox.create(existing, run_id=existing, tracking_uri=tracking_uri,
                                                           experiment=experiment, experiment_id=None,
                                                           run_name=run_name))
        if resume_run_id:
            return RunTracker(box, client, merge_steps(box.max_steps(), last_logged_steps(client, existing)),
                              adopted=True)
        tracker = RunTracker(box, client, heartbeat=heartbeat, adopted=True)
        tracker.set_tags({**tags, **({"mlflow.runName": run_name} if run_name else {})})
        return tracker
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = server.experiment_id_for(client, experiment)
    except MlflowException as error:
        raise MlexpError(f"cannot use MLflow experiment {experiment!r} at {tracking_uri}: "
                         f"{server.first_line(error)}") from None
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    new_id = server.create_run(client, experiment_id, run_name, tags)
    box = claim(Outbox.create(new_id, run_id=new_id, tracking_uri=tracking_uri, experiment=experiment,
                              experiment_id=experiment_id, run_name=run_name, tags=tags))
    return RunTracker(box, client, heartbeat=heartbeat)


def _open_offline(experiment: str, run_name: str | None, run_id: str | None, resume_run_id: str | None,
                  parent_run_id: str | None, tags: dict[str, str]) -> RunTracker:
    existing = resume_run_id or run_id
    if existing:
        box = Outbox.find(existing)
        if box is None:
            raise MlexpError(f"no offline run {existing!r} in {outbox_root()} (set $MLEXP_OUTBOX_DIR if it "
                             "was recorded elsewhere)")
        claim(box)
        if resume_run_id:
            return RunTracker(box, None, box.max_steps())
        tracker = RunTracker(box, None)
        tracker.set_tags(tags)
        return tracker
    return RunTracker(claim(create_offline_run(experiment, run_name, parent_run_id, tags)), None)


def create_offline_run(experiment: str, run_name: str | None, parent_local_id: str | None,
                       tags: dict[str, str]) -> Outbox:
    """An outbox for a run the server will only learn of at `mlexp sync` (tagged to find it then)."""
    local_id = new_local_id()
    tags = {**tags, "mlexp.local_id": local_id}
    return Outbox.create(local_id, run_id=None, tracking_uri=None, experiment=experiment, experiment_id=None,
                         run_name=run_name, parent_local_id=parent_local_id, tags=tags, offline=True)


def create_child_run(parent: RunTracker, run_name: str, tags: dict[str, str]) -> str:
    """A sweep child nested under `parent`, created before it trains; returns its id."""
    tags = {**tags, "mlflow.runName": run_name}
    info = parent.outbox.info()
    if parent.offline:
        return create_offline_run(info.experiment or DEFAULT_EXPERIMENT, run_name, parent.local_id, tags).info().local_id
    return server.create_run(parent.client, parent.experiment_id(), run_name,
                             {**tags, "mlflow.parentRunId": parent.run_id})


def end_run(tracking_uri: str, run_id: str, status: str, message: str, tags: dict[str, str] | None = None,
            offline: bool = False, wait_s: float = 10.0) -> Delivery | None:
    """End a run this process did not train (a sweep child that never started, a reaped run),
    with `mlexp.error` saying why. A run whose own outbox on this machine already holds how
    it ended (it finished training while the server was away) is not touched: None."""
    box = Outbox.find(run_id)
    if box is not None and box.info().status in TERMINAL:
        return None
    tracker = open_run(tracking_uri, "", None, run_id=run_id, offline=offline, heartbeat=False)
    if tags:
        tracker.set_tags(tags)
    return tracker.finish(status, error=message, wait_s=wait_s)
