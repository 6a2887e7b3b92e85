"""From a run to a model people use, end to end against a real `mlflow server`:

a training run on a folder with train/, val/ and test/ logs its test report with the
best-on-validation weights, two logged models linked to their steps' metrics and to the three
datasets, and system metrics; the MLflow UI (headless Chromium) shows them; `mlexp register`
points an alias at the best model; `mlflow models serve` answers a POST of images with the
predictions `mlexp evaluate` gives; `--weights models:/NAME@champion` fine-tunes from it; and
every bad input is one line and exit status 2.

The UI is Debian's `chromium` (installed by `.ci/run`) rendering pages of the real server.
MLflow 3's UI opens an experiment on its GenAI overview ("Traces 0", token usage) unless the
address asks for the model-training view: the address mlexp prints must open on the runs.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from mlexp.tracking.local_server import start_local_server, stop_local_server
from tests.helpers import run_mlexp, subprocess_env

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A tiny network trained fast enough to overshoot: its validation accuracy peaks before the last
# epoch, so the best and the final weights differ (what the test-set check needs).
# 8x8 digits saved as PNGs: a folder of tiny images, so the whole image is resized (a random
# crop would cut the digit away), as the README tells users of such folders.
TRAIN = ["--backbone", "test_resnet", "--init", "scratch", "--img-size", "16", "--scratch-epochs-mult", "1",
         "--calibrate", "false", "--epochs", "8", "--lr", "0.02", "--early-stop-patience", "1",
         "--train-crop", "resize"]


def page_text(url: str) -> str:
    """The rendered page's visible text, after its scripts ran (virtual time: 20 s)."""
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def write_digits_folder(root: Path) -> Path:
    """scikit-learn's digits as PNG files in train/ (60%), val/ (20%) and test/ (20%)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    for position, index in enumerate(order):
        split = "train" if position < 0.6 * len(order) else "val" if position < 0.8 * len(order) else "test"
        folder = root / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"{index:04d}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(client: MlflowClient, run_id: str, key: str) -> float:
    return client.get_run(run_id).data.metrics[key]


def evaluation_run(client: MlflowClient, output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("mlexp: evaluation run "))
    return line.split()[3].rstrip(":")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("MLEXP_REQUIRE_CHROMIUM"),
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_a_run_becomes_a_registered_served_evaluated_model(tmp_path):
    server, uri = start_local_server(tmp_path / "server")
    serving = None
    try:
        data = write_digits_folder(tmp_path / "digits")
        env = subprocess_env(uri, MLEXP_SYSTEM_METRICS_S="1")
        client = MlflowClient(uri)

        # --- the training run: test report, logged models, datasets, system metrics ---------------
        done = run_mlexp(["train", *TRAIN, "--data", str(data), "--experiment", "models", "--run-name", "trained"],
                         env, tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        [run] = client.search_runs([client.get_experiment_by_name("models").experiment_id])
        run_id, metrics = run.info.run_id, run.data.metrics
        assert run.info.status == "FINISHED"
        for key in ("test/acc", "test/loss", "test/top5", "test/balanced_acc", "test/macro_f1",
                    "val/top5", "val/balanced_acc", "val/macro_f1"):
            assert key in metrics, key
        last_epoch = max(point.step for point in client.get_metric_history(run_id, "val/acc"))
        assert metrics["test/epoch"] == metrics["best/epoch"] < last_epoch  # the best weights, not the last
        artifacts = {f.path for split in ("test", "val") for f in client.list_artifacts(run_id, f"evaluation/{split}")}
        assert {f"evaluation/{split}/{name}" for split in ("test", "val") for name in
                ("per_class.csv", "confusion_matrix.csv", "confusion_matrix.png")} <= artifacts

        contexts = {d.dataset.name: [t.value for t in d.tags if t.key == "mlflow.data.context"]
                    for d in run.inputs.dataset_inputs}
        assert contexts == {"digits-train": ["train"], "digits-val": ["val"], "digits-test": ["test"]}
        profile = {d.dataset.name: json.loads(d.dataset.profile) for d in run.inputs.dataset_inputs}
        assert profile["digits-test"]["num_images"] == len(list((data / "test").rglob("*.png")))
        assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 2

        models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                             order_by=[{"field_name": "metrics.val/acc", "ascending": False}])
        val_acc = {m.name: next(x.value for x in m.metrics if x.key == "val/acc") for m in models}
        assert sorted(val_acc) == ["best", "final"] and val_acc["best"] >= val_acc["final"]
        if val_acc["best"] > val_acc["final"]:  # ordered by val/acc, the best first (a tie has no order)
            assert [m.name for m in models] == ["best", "final"]
        best, final = sorted(models, key=lambda m: m.name)
        assert {o.model_id: o.step for o in run.outputs.model_outputs} == {best.model_id: metrics["best/epoch"],
                                                                          final.model_id: last_epoch}
        linked = {(m.key, m.step, m.dataset_name) for m in best.metrics}
        assert ("val/acc", metrics["best/epoch"], "digits-val") in linked
        assert ("test/acc", last_epoch, "digits-test") in linked
        assert ("val/acc", last_epoch, "digits-val") in {(m.key, m.step, m.dataset_name) for m in final.metrics}

        # --- the MLflow UI shows the run with its models, datasets and system metrics ---------------
        [address] = [line.split("open it: ", 1)[1].split()[0] for line in done.stdout.splitlines()
                     if "open it: " in line]
        assert address.endswith("?workflowType=machine_learning") and "/#/experiments/" in address
        runs_page = page_text(address)
        assert "trained" in runs_page and "1 matching run" in runs_page  # the runs table
        assert "Traces 0" not in runs_page and "Token Usage" not in runs_page  # not the GenAI overview
        base = address.split("#")[0]
        run_page = page_text(f"{base}#/experiments/{run.info.experiment_id}/runs/{run_id}")
        assert re.search(r"Datasets digits-train \(\w+\) train \+2", run_page)  # three datasets, the first named
        assert "Logged models (2)" in run_page and " best Ready " in run_page and " final Ready " in run_page
        assert "System metrics (8) system/cpu_utilization_percentage" in run_page

        # --- the registry, evaluate, serving ----------------------------------------------------------
        registered = run_mlexp(["register", "--name", "digits-classifier", "--experiment", "models"], env, tmp_path)
        assert registered.returncode == 0, registered.stderr[-2000:]
        assert client.get_model_version_by_alias("digits-classifier", "champion").version == "1"

        evaluated = run_mlexp(["evaluate", "--model", "models:/digits-classifier@champion", "--data",
                               str(data / "test")], env, tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        eval_id = evaluation_run(client, evaluated.stdout)
        assert metric(client, eval_id, "test/acc") == metrics["test/acc"]
        assert metric(client, eval_id, "test/loss") == pytest.approx(metrics["test/loss"], rel=1e-5)
        eval_run = client.get_run(eval_id)
        assert [m.model_id for m in eval_run.inputs.model_inputs] == [best.model_id]
        assert {f.path for f in client.list_artifacts(eval_id, "evaluation/test")} >= {
            "evaluation/test/predictions.csv", "evaluation/test/per_class.csv", "evaluation/test/confusion_matrix.png"}
        # The final weights answer differently: the training run's test/* came from the best ones.
        other = run_mlexp(["evaluate", "--model", f"runs:/{run_id}/final", "--data", str(data / "test")], env, tmp_path)
        assert other.returncode == 0, other.stderr[-2000:]
        assert metric(client, evaluation_run(client, other.stdout), "test/loss") != pytest.approx(
            metrics["test/loss"], rel=1e-5)

        predictions = pd.read_csv(client.download_artifacts(eval_id, "evaluation/test/predictions.csv",
                                                            str(tmp_path)))[:8]
        images = np.stack([np.asarray(Image.open(data / "test" / name).convert("RGB")) for name in predictions.image])
        port = free_port()
        serving = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/digits-classifier@champion",
                                    "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                   env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        answer = post_when_up(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()}, serving)
        probabilities = pd.DataFrame(answer["predictions"])
        assert probabilities.shape == (8, 10)
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        assert probabilities.idxmax(axis=1).astype(int).tolist() == predictions.predicted.astype(int).tolist()

        # --- fine-tuning from the registered model; no test set is one line, not an error -----------
        tuned = run_mlexp(["train", *TRAIN[:8], "--epochs", "1", "--data", "digits", "--weights",
                           "models:/digits-classifier@champion", "--init", "pretrained", "--experiment", "tuned",
                           "--system-metrics", "false"], env, tmp_path)
        assert tuned.returncode == 0, tuned.stdout[-2000:] + tuned.stderr[-2000:]
        assert "no test set" in tuned.stdout and "skipped" in tuned.stdout
        [tuned_run] = client.search_runs([client.get_experiment_by_name("tuned").experiment_id])
        assert tuned_run.data.params["weights_source"] == "mlflow-model"
        assert not any(key.startswith("system/") for key in tuned_run.data.metrics)

        # --- bad input: one line, exit status 2 ------------------------------------------------------
        registered_elsewhere(client, run_id)
        other_classes = tmp_path / "letters"
        for name in ("a", "0"):
            (other_classes / name).mkdir(parents=True)
            shutil.copy(next((data / "test" / "0").glob("*.png")), other_classes / name / "x.png")
        cases = {("evaluate", "--model", "models:/no-such-model@champion", "--data", str(data / "test")): "not found",
                 ("evaluate", "--model", "models:/digits-classifier@champion", "--data", str(other_classes)):
                     "missing 1, 2, 3, 4, 5, 6, 7, 8, 9; not trained on a",
                 ("evaluate", "--model", "models:/not-mlexp@champion", "--data", str(data / "test")):
                     "is not an mlexp image classifier",
                 ("register", "--name", "not-mlexp", "--experiment", "models"): "was not registered by mlexp"}
        for args, expected in cases.items():
            failed = run_mlexp(list(args), env, tmp_path)
            assert failed.returncode == 2 and expected in failed.stderr, (args, failed.stderr[-2000:])
            assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
        assert all(r.info.status != "RUNNING" for r in client.search_runs(
            [e.experiment_id for e in client.search_experiments()]))
    finally:
        if serving is not None:
            os.killpg(serving.pid, 15)
            serving.wait(30)
        stop_local_server(server)


def registered_elsewhere(client: MlflowClient, run_id: str) -> None:
    """A registered model that some other tool made (a file logged by hand), aliased champion."""
    client.create_registered_model("not-mlexp")
    version = client.create_model_version("not-mlexp", source=f"runs:/{run_id}/config.json", run_id=run_id)
    client.set_registered_model_alias("not-mlexp", "champion", version.version)


def served_predictions(model_dir: Path, images: np.ndarray, env: dict, cwd: Path) -> pd.DataFrame:
    """What `mlflow models serve` of a model folder answers to a POST of these images."""
    port = free_port()
    serving = subprocess.Popen(["mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        answer = post_when_up(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()}, serving)
    finally:
        os.killpg(serving.pid, 15)
        serving.wait(30)
    return pd.DataFrame(answer["predictions"])


def post_when_up(url: str, payload: dict, process: subprocess.Popen, timeout_s: float = 180) -> dict:
    body = json.dumps(payload).encode()
    deadline = time.time() + timeout_s
    while True:
        try:
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except (ConnectionError, urllib.error.URLError):
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"mlflow models serve did not answer (exit {process.poll()})")
            time.sleep(1)
