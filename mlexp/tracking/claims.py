"""Claims on the tracking server: one parent run per grid, one trainer per configuration.

Several launchers (two `mlexp sweep` commands, a launcher and a Ray retry) may work on one
grid at once. MLflow has no lock, but two of its writes succeed for exactly one of several
racing processes, whatever the store behind the server (SQLite, PostgreSQL) and however
many server workers answer:

- a param is immutable: logging `key=value` on a run that already has `key` with another
  value is refused (INVALID_PARAMETER_VALUE), so the first writer of a key owns it;
- an experiment name is unique, even once the experiment is deleted: creating one whose
  name exists is refused (RESOURCE_ALREADY_EXISTS).

A grid's parent run is found by its `mlexp.grid_hash` tag; when there is none, each
launcher creates a candidate and the first to create the (at once deleted, so hidden)
experiment `mlexp-lock/<experiment id>/sweep-<grid hash>` names the parent in its tags;
the others delete their candidates. A configuration is trained only under a claim: the
param `mlexp.claim.<config hash>.<attempt>` on the parent, its value `owner@milliseconds`.
Each attempt (a launch, a Ray retry, a take-over) writes the next attempt number, so of
two racing attempts one wins. A claim may be taken over when its run ended KILLED, or its
trainer stopped beating (mlexp.heartbeat), or it never started within START_GRACE_S.
"""

# Imported where used: `mlflow` (about 1.4 s), because `mlexp --help`, the option checks and
# their one-line errors import this module and come before it.
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

from mlexp.tracking import server
from mlexp.tracking.run import heartbeat_s

CLAIM = "mlexp.claim"
GRID_TAG = "mlexp.grid_hash"
LOCK_PREFIX = "mlexp-lock"
START_GRACE_S = 90.0  # from a claim to its trainer's first heartbeat (process start, imports, data)
LOST_AFTER_PERIODS = 1.5  # as `mlexp monitor`: 1.5 heartbeat periods of silence and a trainer is gone


def new_owner() -> str:
    """Who claims: readable in the parent's params (host and pid), unique (a random suffix)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def now_ms() -> int:
    return int(time.time() * 1000)


# --- set-once values --------------------------------------------------------------------------
def set_once(client, run_id: str, key: str, value: str) -> bool:
    """Log param `key=value` unless the run has `key` already; True when `value` is the one held."""
    from mlflow.exceptions import MlflowException

    try:
        server.retry_when_locked(lambda: client.log_param(run_id, key, value))
        return True
    except MlflowException as error:
        if server.error_code(error) != "INVALID_PARAMETER_VALUE":
            raise
    return client.get_run(run_id).data.params.get(key) == value


# --- the grid's parent run ----------------------------------------------------------------------
def sweep_parent(client, experiment_id: str, grid_hash: str, create_candidate,
                 keep: str | None = None) -> tuple[str, bool]:
    """The grid's parent run id, and whether this call created it.

    `create_candidate()` creates a new run (tagged with the grid hash) and returns its id;
    it is called only when the grid has no parent yet, and its run is deleted again when
    another launcher's candidate won the race (but `keep`: a run `mlflow run` created)."""

    lock = f"{LOCK_PREFIX}/{experiment_id}/sweep-{grid_hash}"
    # The lock is read before the runs are listed: a run the lock names was created before
    # the lock, so the listing that follows holds it (unless someone deleted it since).
    named = lock_value(client, lock)
    existing = grid_runs(client, experiment_id, grid_hash)
    if existing:
        if named in existing:
            return named, False
        if named is None:
            # Candidates but no lock yet: a race is being settled. Settle it as one more
            # contender would, for the oldest candidate; whoever creates the lock decides.
            return decide(client, lock, existing[0]), False
        return existing[0], False  # the named parent was deleted by hand: the oldest left
    candidate = create_candidate()
    winner = decide(client, lock, candidate)
    if winner != candidate and candidate != keep:
        client.delete_run(candidate)
    return winner, winner == candidate


def decide(client, lock: str, proposed: str) -> str:
    """Create the lock naming `proposed`; the run the lock names, whoever created it."""
    from mlflow.exceptions import MlflowException

    try:
        lock_id = server.retry_when_locked(
            lambda: client.create_experiment(lock, tags={"mlexp.parent_run_id": proposed,
                                                         "mlexp.note": "marks a sweep's parent run; hidden"}))
    except MlflowException as error:
        if server.error_code(error) != "RESOURCE_ALREADY_EXISTS":
            raise
        return lock_value(client, lock) or proposed  # its tags are written with it, in one transaction
    client.delete_experiment(lock_id)  # deleted: out of the experiment list, its name still taken
    return proposed


def grid_runs(client, experiment_id: str, grid_hash: str) -> list[str]:
    """The grid's parent runs, oldest first (one, unless a race is being settled)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{GRID_TAG}` = '{grid_hash}'",
                              order_by=["attributes.start_time ASC"], max_results=100)
    return [run.info.run_id for run in runs]


def lock_value(client, lock: str) -> str | None:
    found = client.get_experiment_by_name(lock)
    return found.tags.get("mlexp.parent_run_id") if found is not None else None


# --- configurations --------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    config_hash: str
    number: int
    owner: str
    time_ms: int

    @property
    def key(self) -> str:
        return f"{CLAIM}.{self.config_hash}.{self.number}"

    @property
    def value(self) -> str:
        return f"{self.owner}@{self.time_ms}"


def attempts(params: dict[str, str]) -> dict[str, Attempt]:
    """config hash -> its newest attempt, from the parent's params."""
    newest: dict[str, Attempt] = {}
    for key, value in params.items():
        if not key.startswith(CLAIM + "."):
            continue
        config_hash, number = key[len(CLAIM) + 1:].rsplit(".", 1)
        owner, _, stamp = value.rpartition("@")
        attempt = Attempt(config_hash, int(number), owner, int(stamp or 0))
        if config_hash not in newest or attempt.number > newest[config_hash].number:
            newest[config_hash] = attempt
    return newest


@dataclass
class GridState:
    """What the server says of each configuration of one parent: its newest claim and run."""

    claims: dict[str, Attempt]
    children: dict[str, object]  # config hash -> its mlflow Run under this parent

    def status(self, config_hash: str) -> str | None:
        run = self.children.get(config_hash)
        return run.info.status if run is not None else None

    def held_elsewhere(self, config_hash: str, owner: str, now: float | None = None) -> str | None:
        """The owner of a live claim that is not `owner`'s, else None (free to claim)."""
        attempt = self.claims.get(config_hash)
        if attempt is None or attempt.owner == owner:
            return None
        run = self.children.get(config_hash)
        status = run.info.status if run is not None else "RUNNING"
        if status != "RUNNING":
            return None  # ended: FINISHED and FAILED are decided elsewhere, KILLED is free
        now = time.time() if now is None else now
        beat = run.data.tags.get("mlexp.heartbeat") if run is not None else None
        if beat and int(beat) >= attempt.time_ms:
            period = float(run.data.tags.get("mlexp.heartbeat_s", heartbeat_s()))
            return attempt.owner if now - int(beat) / 1000 <= LOST_AFTER_PERIODS * period else None
        return attempt.owner if now - attempt.time_ms / 1000 <= START_GRACE_S else None


def read_state(client, experiment_id: str, parent_run_id: str) -> GridState:
    params = client.get_run(parent_run_id).data.params
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    children: dict[str, object] = {}
    for run in runs:  # the newest run of a configuration counts (older ones: before claims existed)
        config_hash = run.data.tags.get("mlexp.config_hash")
        if config_hash:
            children[config_hash] = run
    return GridState(attempts(params), children)


def claim(client, experiment_id: str, parent_run_id: str, config_hash: str, owner: str,
          retry_failed: bool = False) -> Attempt | None:
    """Take the next attempt at a configuration; None when it is done, held elsewhere, or
    another launcher won the race for that attempt."""
    state = read_state(client, experiment_id, parent_run_id)
    status = state.status(config_hash)
    if status == "FINISHED" or (status == "FAILED" and not retry_failed):
        return None
    if state.held_elsewhere(config_hash, owner):
        return None
    newest = state.claims.get(config_hash)
    attempt = Attempt(config_hash, (newest.number if newest else 0) + 1, owner, now_ms())
    return attempt if set_once(client, parent_run_id, attempt.key, attempt.value) else None


def child_run(client, experiment_id: str, parent_run_id: str, config_hash: str, run_name: str,
              tags: dict[str, str]) -> tuple[str, bool]:
    """The configuration's run under the parent (its claim holder alone calls this), created
    if it has none: (run id, created). An existing one is resumed in place, never duplicated."""
    existing = read_state(client, experiment_id, parent_run_id).children.get(config_hash)
    if existing is not None:
        return existing.info.run_id, False
    tags = {**tags, "mlexp.config_hash": config_hash, "mlflow.parentRunId": parent_run_id,
            "mlexp.sweep_id": parent_run_id}
    return server.create_run(client, experiment_id, run_name, tags), True
