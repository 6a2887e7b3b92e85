"""Resume: atomic checkpoints, and finding a consistent one to continue from.

A checkpoint becomes visible as a whole or not at all. Every epoch's resume state (weights,
EMA weights, optimizer, scheduler, grad scaler, strategy phase, history, RNG, counters)
goes to a fresh folder `checkpoints/last/epoch_NNNN/`; then a small manifest
(`checkpoints/last/manifest.json`: epoch, step, folder, sha256 and size of each file) is
published, after the files and after the metrics the checkpoint covers; then older epoch
folders are pruned, so `last/` costs one checkpoint of storage. A resume reads the manifest
and uses its folder only if every file matches its sha256. Whatever the moment of a kill,
the manifest names a complete folder (the previous one until the new one is whole).

A resume on the machine that ran the run also looks in the run's outbox: a checkpoint
that was written but not yet uploaded (the server was away) is newer and just as good.
A run killed before its first checkpoint starts over in the same run.
"""

# Imported where used: `mlflow` (about 1.4 s), because a training run imports this module and its first
# step should not wait for them (only asking the server about a resumed run does).
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlexp import faults
from mlexp.config import TrainConfig
from mlexp.credentials import redact
from mlexp.errors import MlexpError
from mlexp.tracking import server
from mlexp.tracking.outbox import Outbox
from mlexp.tracking.server import file_sha256
from mlexp.training import checkpoints
from mlexp.training.loop import TrainParts
from mlexp.training.records import History

LAST = "checkpoints/last"
BEST = "checkpoints/best"
BEST_STATE = "state"  # checkpoints/best/state/: the best epoch's whole training state, with --best-checkpoint full


@dataclass
class ResumePoint:
    """A run to continue: its effective config and a verified checkpoint (None: start over)."""

    run_id: str
    config: TrainConfig
    checkpoint_dir: Path | None
    epoch: int
    tracking_uri: str | None
    offline: bool
    download_dir: Path | None = None  # removed by `cleanup`
    branch: bool = False  # --resume-from best: a new run continues from the run's best checkpoint

    def cleanup(self) -> None:
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)


# --- saving -----------------------------------------------------------------------------------
def state_for_resume(parts: TrainParts, history: History, epoch: int) -> dict:
    scaler = parts.accelerator.scaler
    return {"epoch": epoch, "global_step": parts.global_step, "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "strategy": parts.strategy.state_dict(), "history": history.to_state(), "rng": checkpoints.rng_state()}


def write_manifest(folder: Path, epoch: int, global_step: int) -> dict:
    files = {path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
             for path in sorted(folder.iterdir()) if path.is_file() and path.name != server.MANIFEST}
    manifest = {"epoch": epoch, "global_step": global_step, "folder": f"epoch_{epoch:04d}", "files": files}
    (folder / server.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def save_epoch_checkpoints(parts: TrainParts, history: History, epoch: int, is_best: bool, tracker,
                           cfg: TrainConfig) -> None:
    """checkpoints/last/ every epoch (atomic, for resume), best/ on improvement, epoch_NNN/ every N epochs."""
    if not parts.accelerator.is_main_process:
        return
    weights = parts.module.state_dict()
    ema = parts.ema.module.state_dict() if parts.ema is not None else None
    eval_weights = ema if ema is not None else weights
    if is_best:
        best = tracker.staging_dir(f"best-{epoch}")
        checkpoints.save_weights(eval_weights, best / checkpoints.WEIGHTS_FILE)
        if cfg.best_checkpoint == "full":  # resumable: `--resume RUN --resume-from best`
            state = checkpoints.save_training_state(best / BEST_STATE, weights, state_for_resume(parts, history, epoch),
                                                    ema)
            write_manifest(state, epoch, parts.global_step)
        tracker.log_artifacts(best, BEST)
        tracker.supersede(BEST, keep_newest=True)  # an older best not sent yet is never needed
    if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
        snapshot = tracker.staging_dir(f"snap-{epoch}")
        checkpoints.save_weights(eval_weights, snapshot / checkpoints.WEIGHTS_FILE)
        tracker.log_artifacts(snapshot, f"checkpoints/epoch_{epoch:03d}")
    last = tracker.staging_dir(f"last-{epoch}")
    checkpoints.save_training_state(last, weights, state_for_resume(parts, history, epoch), ema)
    manifest = write_manifest(last, epoch, parts.global_step)
    published = tracker.staging_dir(f"manifest-{epoch}")
    shutil.copyfile(last / server.MANIFEST, published / server.MANIFEST)
    faults.crash_point("checkpoint", epoch)
    tracker.remember("checkpoint", {"epoch": epoch, "dir": str(last)})
    # Only now, with the new checkpoint whole on disk, remembered and queued, may an unsent older
    # one (the server is away or busy) go: whatever ends the process in between, a SIGKILL or a
    # Ctrl-C whose clean end empties the outbox, one of the two stays queued to resume from.
    tracker.log_artifacts(last, f"{LAST}/{manifest['folder']}")
    tracker.supersede(LAST, keep_newest=True)
    tracker.publish_checkpoint(published, LAST, epoch)


# --- loading ----------------------------------------------------------------------------------
def restore(resume: ResumePoint, parts: TrainParts) -> tuple[History, int]:
    """Load the checkpoint into the built parts; returns the history and the next epoch."""
    if resume.checkpoint_dir is None:
        return History(), 1
    weights, state, ema = checkpoints.load_training_state(resume.checkpoint_dir)
    parts.module.load_state_dict(weights)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and parts.accelerator.scaler is not None:
        parts.accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None and parts.ema is not None:
        parts.ema.module.load_state_dict(ema)
    parts.strategy.load_state_dict(state["strategy"])
    parts.global_step = state["global_step"]
    checkpoints.restore_rng_state(state["rng"])
    return History.from_state(state["history"]), state["epoch"] + 1


def verified(folder: Path) -> dict | None:
    """The folder's manifest if every file it lists is there with its sha256; else None."""
    try:
        manifest = json.loads((folder / server.MANIFEST).read_text())
        for name, expected in manifest["files"].items():
            if file_sha256(folder / name) != expected["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


def find_resume_point(tracking_uri: str, run_id: str, offline: bool = False, from_best: bool = False) -> ResumePoint:
    """What `--resume RUN_ID` continues from; refuses (one line) a run that cannot be resumed."""
    if from_best:
        return best_resume_point(tracking_uri, run_id, offline)
    box = Outbox.find(run_id)
    info = box.info() if box is not None else None
    if info is not None and info.offline and info.run_id is None:
        return _local_resume_point(box, run_id)
    if info is not None and info.run_id:  # an offline run synced since: continue the server's run
        run_id, tracking_uri = info.run_id, info.tracking_uri or tracking_uri
    if offline:
        raise MlexpError(f"no offline run {run_id!r} on this machine to resume offline")
    server.check_reachable(tracking_uri)
    client = server.client_for(tracking_uri)
    run_id = _server_run_id(client, run_id, tracking_uri)
    status = client.get_run(run_id).info.status
    if status == "FINISHED" or (info is not None and info.status == "FINISHED"):
        raise MlexpError(f"run {run_id} already FINISHED; nothing to resume (start a new run instead"
                         + (", and `mlexp sync` to send what it left" if status != "FINISHED" else "") + ")")
    config = read_started_config(tracking_uri, run_id, offline=False, box=box)
    if config is None:
        raise MlexpError(f"cannot resume run {run_id}: it has no config.json (it was not started by mlexp train)")
    download_dir = Path(tempfile.mkdtemp(prefix="mlexp-resume-"))
    try:
        local = _local_checkpoint(box, download_dir)
        remote = None if local and local[1]["epoch"] >= _server_epoch(client, run_id) else \
            _server_checkpoint(client, run_id, download_dir)
        best = max([c for c in (local, remote) if c], key=lambda c: c[1]["epoch"], default=None)
    except BaseException:
        shutil.rmtree(download_dir, ignore_errors=True)
        raise
    return ResumePoint(run_id, config, best[0] if best else None, best[1]["epoch"] if best else 0,
                       tracking_uri, False, download_dir)


def best_resume_point(tracking_uri: str, run_id: str, offline: bool) -> ResumePoint:
    """`--resume RUN --resume-from best`: the run's best checkpoint with its whole training state
    (kept with --best-checkpoint full), for a new run that continues from that epoch; the run
    itself, finished or not, is left as it is."""
    if offline:
        raise MlexpError("--resume-from best reads the run's best checkpoint from the tracking server; "
                         "sync the run first (`mlexp sync`) and resume without --offline")
    server.check_reachable(tracking_uri)
    client = server.client_for(tracking_uri)
    run_id = _server_run_id(client, run_id, tracking_uri)
    config = read_started_config(tracking_uri, run_id, offline=False)
    if config is None:
        raise MlexpError(f"cannot resume run {run_id}: it has no config.json (it was not started by mlexp train)")
    path = f"{BEST}/{BEST_STATE}"
    if not server.artifact_exists(client, run_id, f"{path}/{server.MANIFEST}"):
        raise MlexpError(f"run {run_id} kept only the weights of its best epoch (--best-checkpoint weights); train "
                         "with --best-checkpoint full to resume from best, or start from its best weights with "
                         f"--weights runs:/{run_id}/{BEST}/{checkpoints.WEIGHTS_FILE}")
    download_dir = Path(tempfile.mkdtemp(prefix="mlexp-resume-"))
    try:
        folder = server.download(client, run_id, path, download_dir)
        manifest = verified(folder)
        if manifest is None:
            raise MlexpError(f"run {run_id}'s best checkpoint does not match its manifest (sha256); it cannot be "
                             "resumed from safely")
    except BaseException:
        shutil.rmtree(download_dir, ignore_errors=True)
        raise
    return ResumePoint(run_id, config, folder, manifest["epoch"], tracking_uri, False, download_dir, branch=True)


def read_started_config(tracking_uri: str, run_id: str, offline: bool,
                        box: Outbox | None = None) -> TrainConfig | None:
    """The effective config a run started training with (its config.json), None if it has not.
    `box`: the run's outbox on this machine, when the caller has it (an offline run synced since)."""
    box = box or Outbox.find(run_id)
    values = box.get("config") if box is not None else None
    if values is None and not offline:
        from mlflow.exceptions import MlflowException

        client = server.client_for(tracking_uri)
        # A config.json that is there but cannot be read now is an error, never "not started":
        # training the run over would throw its progress away.
        try:
            listed = server.artifact_exists(client, run_id, "config.json")
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise MlexpError(f"cannot list run {run_id}'s artifacts at {redact(tracking_uri)} now "
                             f"({server.first_line(error)}); try again") from None
        if listed:
            values = server.read_json_artifact(client, run_id, "config.json")
            if values is None:
                raise MlexpError(f"cannot read run {run_id}'s config.json from {redact(tracking_uri)} now; try again")
    return TrainConfig.from_dict(values).replace(resume=None) if values is not None else None


def _server_run_id(client, run_id: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.run_id
    except MlflowException:
        found = server.find_run_by_local_id(client, run_id)
        if found:
            return found
    raise MlexpError(f"cannot resume: no MLflow run {run_id!r} at {tracking_uri}; check the run id "
                     "(mlflow ui shows it) and --tracking-uri")


def _local_resume_point(box: Outbox, run_id: str) -> ResumePoint:
    status = box.info().status
    if status == "FINISHED":
        raise MlexpError(f"offline run {run_id} already FINISHED; nothing to resume")
    config = box.get("config")
    if config is None:
        raise MlexpError(f"cannot resume offline run {run_id}: it recorded no configuration")
    download_dir = Path(tempfile.mkdtemp(prefix="mlexp-resume-"))
    local = _local_checkpoint(box, download_dir)
    return ResumePoint(run_id, TrainConfig.from_dict(config).replace(resume=None), local[0] if local else None,
                       local[1]["epoch"] if local else 0, None, True, download_dir)


def _local_checkpoint(box: Outbox | None, target: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint still in the run's outbox (written, maybe not uploaded), if whole.

    Copied out first: the resumed run's sender uploads and then deletes the outbox's copy.
    """
    latest = box.get("checkpoint") if box is not None else None
    if not latest or not Path(latest["dir"]).is_dir():
        return None
    folder = target / "local"
    try:
        shutil.copytree(latest["dir"], folder)
    except OSError:  # uploaded and removed meanwhile: the server has it
        shutil.rmtree(folder, ignore_errors=True)
        return None
    manifest = verified(folder)
    return (folder, manifest) if manifest else None


def _server_manifest(client, run_id: str) -> dict | None:
    """The server's checkpoint manifest; None only when the run has none. A manifest that is
    there but cannot be read is an error, never "no checkpoint": starting over would
    throw away the run's progress."""
    if not server.artifact_exists(client, run_id, f"{LAST}/{server.MANIFEST}"):
        return None
    manifest = server.read_json_artifact(client, run_id, f"{LAST}/{server.MANIFEST}")
    if not manifest:
        raise MlexpError(f"cannot read the checkpoint manifest of run {run_id} now; try the resume again")
    return manifest


def _server_epoch(client, run_id: str) -> int:
    manifest = _server_manifest(client, run_id)
    return manifest["epoch"] if manifest else 0


def _server_checkpoint(client, run_id: str, target: Path) -> tuple[Path, dict] | None:
    """The checkpoint the server's manifest names, downloaded and verified."""
    from mlflow.exceptions import MlflowException

    manifest = _server_manifest(client, run_id)
    if not manifest:
        return _newest_whole_folder(client, run_id, target)
    try:
        folder = server.download(client, run_id, f"{LAST}/{manifest['folder']}", target)
    except (MlflowException, OSError) as error:
        raise MlexpError(f"cannot download run {run_id}'s checkpoint {manifest['folder']} "
                         f"({server.first_line(error)}); try the resume again") from None
    (folder / server.MANIFEST).write_text(json.dumps(manifest))
    if not verified(folder):
        raise MlexpError(f"run {run_id}'s checkpoint {manifest['folder']} does not match its manifest "
                         "(sha256); it cannot be resumed from safely")
    return folder, manifest


def _newest_whole_folder(client, run_id: str, target: Path) -> tuple[Path, dict] | None:
    """No manifest published yet (the process died, or the server went away, between a
    checkpoint's files and its manifest): each epoch folder carries its own manifest, so
    the newest folder whose files all match it is a whole checkpoint."""
    from mlflow.exceptions import MlflowException

    try:
        folders = sorted((item.path for item in client.list_artifacts(run_id, LAST) if item.is_dir), reverse=True)
    except MlflowException:
        return None
    for path in folders:
        try:
            folder = server.download(client, run_id, path, target)
        except (MlflowException, OSError):
            continue
        manifest = verified(folder)
        if manifest:
            return folder, manifest
    return None
