"""Small helpers shared by the end-to-end tests (real processes, real MLflow)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import timm
from mlflow import MlflowClient

from mlexp.training.checkpoints import save_weights
from tests.warm_start import WarmStarter

ROOT = Path(__file__).resolve().parents[1]
WARM_STARTER = WarmStarter()
DIGITS_TRAIN_SIZE = 1437  # 1,797 digits, 20% held out (stratified, fixed split seed)


def subprocess_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment a user's shell would have: the venv's tools first on PATH, offline hub."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_mlexp(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mlexp ARGS` to its end, output captured (started warm: tests/warm_start.py)."""
    return WARM_STARTER.run(args, env, cwd, timeout)


def write_pretrained_weights(folder: Path, timm_name: str, arch: str, num_classes: int = 1000, seed: int = 0,
                             **kwargs) -> Path:
    """A weights file standing in for ImageNet weights (none can be downloaded here)."""
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(timm_name, num_classes=num_classes, **kwargs)
    return save_weights(model.state_dict(), folder / f"{arch}.safetensors")


def contract_artifacts(last_epoch: int, pretrained: bool = False) -> set[str]:
    """Every file a finished training run must hold (the logging contract); a run that started
    from a weights file also says what that file gave it (weights/load_report.json)."""
    checkpoint = f"checkpoints/last/epoch_{last_epoch:04d}"
    return {*(["weights/load_report.json"] if pretrained else []), "config.json", "checkpoints/last/manifest.json", f"{checkpoint}/model.safetensors",
            f"{checkpoint}/training_state.pt", f"{checkpoint}/manifest.json", "checkpoints/best/model.safetensors",
            "checkpoints/final/model.safetensors", "summary/training_info.json", "metrics/epoch_metrics.csv",
            "metrics/batch_metrics.csv", "evaluation/val/per_class.csv", "evaluation/val/confusion_matrix.csv",
            "evaluation/val/confusion_matrix.png"}


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], max_results=1000)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    """Every file path under a run's artifacts (recursively)."""
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
        else:
            found.add(item.path)
    return found


TORCHRUN_WORKER = """
import os, sys
from safetensors.torch import save_file
from mlexp.commands.cli import main
from mlexp.training import run as train
results = []
original = train.run_training
train.run_training = lambda cfg, **kw: results.append(original(cfg, **kw))
try:
    main(sys.argv[2:])
except SystemExit as done:
    assert done.code in (0, None), done.code
state = {k: v.contiguous() for k, v in results[0].model.state_dict().items()}
save_file(state, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.safetensors"))
"""


def torchrun_train(args: list[str], env: dict[str, str], out: Path, processes: int = 2) -> list[dict]:
    """`torchrun -m mlexp train ARGS` (through the real CLI); returns each rank's final weights."""
    from safetensors.torch import load_file

    worker = out / "torchrun_worker.py"
    worker.write_text(TORCHRUN_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           str(worker), str(out), "train", *args],
                          env=env, cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(out / f"rank{rank}.safetensors") for rank in range(processes)]


def runs_in(db: Path) -> int:
    """Runs in a SQLite MLflow store (0 when the store was never created)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
        return connection.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
