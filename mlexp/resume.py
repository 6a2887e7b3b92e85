"""Resume: what a run saves every epoch to continue later, and how it continues.

`checkpoints/last/` holds the weights (safetensors) and the training state (optimizer,
scheduler, grad scaler, strategy phase, history, RNG, counters; weights-only loadable).
`fetch_resume_point` brings a run's effective config and that folder back from MLflow.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlexp import checkpoint, tracking
from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.loop import TrainParts
from mlexp.records import History


@dataclass
class ResumePoint:
    """A run to continue: its effective config and its checkpoints/last/ folder."""

    run_id: str
    config: TrainConfig
    checkpoint_dir: Path


def state_for_resume(parts: TrainParts, history: History, epoch: int) -> dict:
    scaler = parts.accelerator.scaler
    return {"epoch": epoch, "global_step": parts.global_step, "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "strategy": parts.strategy.state_dict(), "history": history.to_state(), "rng": checkpoint.rng_state()}


def save_epoch_checkpoints(parts: TrainParts, history: History, epoch: int, is_best: bool, tracker,
                           workdir: Path, cfg: TrainConfig) -> None:
    """checkpoints/last/ every epoch (resume), best/ on improvement, epoch_NNN/ every N epochs.

    Queued behind this epoch's metrics, so a checkpoint never lands on the server before
    the metrics it covers (see tracking.py).
    """
    accelerator = parts.accelerator
    if not accelerator.is_main_process:
        return
    weights = parts.module.state_dict()
    ema = parts.ema.module.state_dict() if parts.ema is not None else None
    eval_weights = ema if ema is not None else weights
    last = checkpoint.save_training_state(workdir / f"last-{epoch}", weights,
                                          state_for_resume(parts, history, epoch), ema)
    if is_best:
        best = checkpoint.save_weights(eval_weights, workdir / f"best-{epoch}" / checkpoint.WEIGHTS_FILE)
        tracker.log_artifacts(best.parent, "checkpoints/best", remove_after=True)
    if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
        snapshot = checkpoint.save_weights(eval_weights, workdir / f"snap-{epoch}" / checkpoint.WEIGHTS_FILE)
        tracker.log_artifacts(snapshot.parent, f"checkpoints/epoch_{epoch:03d}", remove_after=True)
    tracker.log_artifacts(last, "checkpoints/last", remove_after=True)


def restore(resume: ResumePoint, parts: TrainParts) -> tuple[History, int]:
    weights, state, ema = checkpoint.load_training_state(resume.checkpoint_dir)
    parts.module.load_state_dict(weights)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and parts.accelerator.scaler is not None:
        parts.accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None and parts.ema is not None:
        parts.ema.module.load_state_dict(ema)
    parts.strategy.load_state_dict(state["strategy"])
    parts.global_step = state["global_step"]
    checkpoint.restore_rng_state(state["rng"])
    if parts.accelerator.is_main_process:
        print(f"mlexp: resuming run {resume.run_id} after epoch {state['epoch']} (step {state['global_step']})")
    return History.from_state(state["history"]), state["epoch"] + 1


def fetch_resume_point(tracking_uri: str, run_id: str) -> ResumePoint:
    """Download the run's effective config and checkpoints/last/ (every process reads its own copy)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    tracking.check_reachable(tracking_uri)
    client = tracking.client_for(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise MlexpError(f"cannot resume: no MLflow run {run_id!r} at {tracking_uri}; check the run id "
                         "(mlflow ui shows it) and --tracking-uri") from None
    target = Path(tempfile.mkdtemp(prefix="mlexp-resume-"))
    try:
        config_path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.json",
                                                          dst_path=str(target), tracking_uri=tracking_uri)
        last = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last",
                                                   dst_path=str(target), tracking_uri=tracking_uri)
    except (MlflowException, OSError) as error:
        raise MlexpError(f"cannot resume run {run_id}: it has no config.json or checkpoints/last/ "
                         f"({str(error).splitlines()[0][:160]}); it may have died before its first epoch ended") from None
    config = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    return ResumePoint(run_id, config.replace(resume=None), Path(last))
