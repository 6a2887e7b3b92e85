"""Credentials in URIs are used to connect and written nowhere; an outbox is its owner's alone."""

from __future__ import annotations

import os
import stat

import pytest

from mlexp.config import TrainConfig
from mlexp.credentials import adopt_uri_credentials, redact
from mlexp.errors import MlexpError
from mlexp.tracking.outbox import Outbox


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:S3cret@mlflow.lab:5000", "http://alice:***@mlflow.lab:5000"),
    ("postgresql://mlflow:S3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("postgresql+psycopg://u:p%40ss@db/mlflow?sslmode=require", "postgresql+psycopg://u:***@db/mlflow?sslmode=require"),
    ("https://mlflow.lab/?token=S3cret&x=1", "https://mlflow.lab/?token=***&x=1"),
    ("mysql://root@db/mlflow", "mysql://root@db/mlflow"),  # no secret, nothing to hide
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_redact_masks_every_secret_and_only_secrets(uri, shown):
    assert redact(uri) == shown
    assert redact(f"cannot reach {uri} (refused)") == f"cannot reach {shown} (refused)"


def test_http_credentials_move_to_mlflow_s_variables(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert adopt_uri_credentials("http://alice:S%3Acret@127.0.0.1:5000/path") == "http://127.0.0.1:5000/path"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "S:cret"
    assert adopt_uri_credentials("postgresql://u:p@db/m") == "postgresql://u:p@db/m"  # a database needs it
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "other")
    with pytest.raises(MlexpError, match=r"http://alice:\*\*\*@host carries a password that differs") as raised:
        adopt_uri_credentials("http://alice:S3cret@host")
    assert "S3cret" not in str(raised.value)


def test_a_config_never_holds_a_secret_in_what_it_writes():
    cfg = TrainConfig(tracking_uri="postgresql://mlflow:S3cret@db/mlflow")
    assert cfg.to_params()["tracking_uri"] == cfg.to_dict()["tracking_uri"] == "postgresql://mlflow:***@db/mlflow"
    assert "S3cret" not in cfg.to_json()
    assert cfg.tracking_uri == "postgresql://mlflow:S3cret@db/mlflow"  # what connects keeps it


def test_an_outbox_is_private_whatever_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("MLEXP_OUTBOX_DIR", str(tmp_path / "outbox"))
    before = os.umask(0o022)
    try:
        box = Outbox.create("run1", run_id="run1", tracking_uri="postgresql://u:S3cret@db/m", experiment="e",
                            experiment_id="1", run_name="r")
        staged = box.staging_dir("metrics")
        (staged / "epoch_metrics.csv").write_text("epoch\n1\n")
        box.add_upload(staged, "metrics")
    finally:
        os.umask(before)
    folders = [tmp_path / "outbox", box.folder, box.files_dir, staged]
    files = [path for path in box.folder.rglob("*") if path.is_file()]
    assert {stat.S_IMODE(folder.stat().st_mode) for folder in folders} == {0o700}
    assert files and {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}
    assert box.info().tracking_uri == "postgresql://u:***@db/m"
    assert not any(b"S3cret" in path.read_bytes() for path in files)
