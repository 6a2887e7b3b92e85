"""What the previous release logged still works with this code: its logged model loads,
evaluates and serves, and its killed run resumes and finishes.

`fixtures/release-0.1-store.tar.gz` is a SQLite MLflow store written by mlexp 0.1.0 itself,
before the package was regrouped into subpackages (commit 0295576), with
`--backbone test_efficientnet --init scratch --data digits --img-size 16 --optimizer sgd
--scratch-epochs-mult 1 --experiment release-0.1`: run `finished` (1 epoch, FINISHED; its
`best` logged model kept, its checkpoints removed to keep the file small) and run `killed`
(`--epochs 2`, SIGKILLed by `MLEXP_FAULT=eval=2` inside epoch 2's evaluation, then
`mlexp sync --all`: RUNNING on the store, with epoch 1's resume checkpoint). The logged
model's code file is the old `mlexp/pyfunc_entry.py`, which imports
`mlexp.logged_models.ImageClassifier`: that path must stay importable.
"""

from __future__ import annotations

import sqlite3
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.helpers import DIGITS_TRAIN_SIZE, run_mlexp, steps, subprocess_env

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release-0.1-store.tar.gz"
OLD_ROOT = "/tmp/mlexp-fixture-store"
FINISHED_RUN = "5392051eacbc4a41b64fafb1c51929b9"
KILLED_RUN = "84272cb4a63948258516136447436a14"
BEST_MODEL = "m-d53ef1a8862e4bbbb217a5eff7153b9c"

pytestmark = pytest.mark.slow


def relocated_store(tmp_path: Path) -> Path:
    """The fixture store unpacked under tmp_path, its absolute artifact paths pointed there."""
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    root = tmp_path / Path(OLD_ROOT).name
    with sqlite3.connect(root / "mlflow.db") as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location")):
            db.execute(f"update {table} set {column} = replace({column}, ?, ?)", (OLD_ROOT, str(root)))
    return root


def digit_images(count: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:count] * (255 / 16)).round().astype(np.uint8)[..., None].repeat(3, axis=-1)


def test_the_previous_release_s_logged_model_loads_evaluates_and_serves(tmp_path):
    from tests.e2e.test_models_e2e import served_predictions, write_digits_folder

    root = relocated_store(tmp_path)
    env = subprocess_env(f"sqlite:///{root / 'mlflow.db'}")
    model_dir = root / "mlruns" / "1" / "models" / BEST_MODEL / "artifacts"
    images = digit_images(2)
    np.save(tmp_path / "images.npy", images)

    # Loaded in a fresh process, as a user's own script would.
    loaded = subprocess.run(
        ["python", "-c", "import sys, numpy, mlflow.pyfunc; model = mlflow.pyfunc.load_model(sys.argv[1]); "
                         "model.predict(numpy.load(sys.argv[2])).to_csv(sys.argv[3], index=False)",
         str(model_dir), str(tmp_path / "images.npy"), str(tmp_path / "loaded.csv")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    probabilities = pd.read_csv(tmp_path / "loaded.csv")
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)

    # Evaluated by its models:/ URI through the store it was logged to.
    data = write_digits_folder(tmp_path / "digits")
    evaluated = run_mlexp(["evaluate", "--model", f"models:/{BEST_MODEL}", "--data", str(data / "test"),
                           "--experiment", "evaluate-old"], env, tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [evaluation] = client.search_runs([client.get_experiment_by_name("evaluate-old").experiment_id])
    assert evaluation.info.status == "FINISHED" and 0.3 < evaluation.data.metrics["test/acc"] <= 1.0

    # Served by `mlflow models serve`, answering what the loaded model answered.
    served = served_predictions(model_dir, images, env, tmp_path)
    assert np.allclose(served.to_numpy(dtype=float), probabilities.to_numpy(dtype=float), atol=1e-5)


def test_the_previous_release_s_killed_run_resumes_from_its_checkpoint(tmp_path):
    root = relocated_store(tmp_path)
    env = subprocess_env(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(KILLED_RUN).info.status == "RUNNING"

    resumed = run_mlexp(["train", "--resume", KILLED_RUN], env, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "epoch   2" in resumed.stdout and "epoch   1" not in resumed.stdout  # from epoch 1's checkpoint

    run = client.get_run(KILLED_RUN)
    assert run.info.status == "FINISHED"
    assert steps(client, KILLED_RUN, "val/acc") == [1, 2]
    batches = steps(client, KILLED_RUN, "batch/loss")
    assert batches == list(range(1, 2 * (DIGITS_TRAIN_SIZE // 32) + 1))  # one point per step, none twice
    assert client.get_run(FINISHED_RUN).info.status == "FINISHED"
