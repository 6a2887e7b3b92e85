"""A network of the user's own, end to end as the README's "Your own model" runs it.

`tests/own_model/mymodels.py` (defined nowhere in mlexp) is copied into a project folder; from
there: pretrain on the built-in synthetic images with the weights exported; a sweep of
pretrained vs scratch x 2 seeds on digits whose pretrained runs pick those weights up; the
ablation variant started from them partially; a killed run resumed; its logged model evaluated
and served from a folder where mymodels.py is not (the model carries its source). The same
sweep under Ray: tests/e2e/test_sweep_ray.py.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from mlexp.models.weight_sources import file_sha256
from tests.faults import only_run
from tests.helpers import artifact_paths, run_mlexp, runs_of, subprocess_env

pytestmark = pytest.mark.slow
OWN_MODEL = Path(__file__).parents[1] / "own_model" / "mymodels.py"
SMALL = ["--data", "digits", "--img-size", "16", "--epochs", "1", "--batch-size", "64", "--calibrate", "false"]


def children(client: MlflowClient, experiment: str) -> list:
    return [r for r in runs_of(client, experiment) if "mlflow.parentRunId" in r.data.tags]


def test_own_model_pretrain_sweep_ablation_resume_and_serve(tmp_path):
    from tests.e2e.test_models_e2e import served_predictions, write_digits_folder

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(OWN_MODEL, project / "mymodels.py")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(uri)
    env.pop("MLEXP_WEIGHTS_DIR", None)
    client = MlflowClient(uri)

    pretrained = run_mlexp(["pretrain", "--backbone", "mymodels:twistnet_tiny", "--data", "synthetic", "--img-size",
                            "16", "--epochs", "1", "--batch-size", "64", "--log-models", "false", "--experiment",
                            "own-pretrain"], env, project)
    assert pretrained.returncode == 0, pretrained.stderr[-3000:]
    exported = project / "weights" / "twistnet_tiny.safetensors"
    assert exported.is_file()
    pretrain_run = only_run(client, "own-pretrain").info.run_id

    swept = run_mlexp(["sweep", "--backbones", "mymodels:twistnet_tiny", "--inits", "pretrained,scratch", "--seeds",
                       "1,2", *SMALL, "--log-models", "false", "--parallel", "2", "--experiment", "own-sweep"],
                      env, project, timeout=600)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    runs = children(client, "own-sweep")
    assert sorted((r.data.tags["mlexp.backbone"], r.data.tags["mlexp.init"], r.info.status) for r in runs) == \
        sorted([("twistnet_tiny", init, "FINISHED") for init in ("pretrained", "scratch") for _ in range(2)])
    for run in runs:
        if run.data.tags["mlexp.init"] == "pretrained":
            assert run.data.params["weights_source"] == "weights-dir"
            assert run.data.params["weights_sha256"] == file_sha256(exported)
        assert run.data.params["classifier"] == "fc (last nn.Linear)"
    assert {r.info.run_name for r in runs} >= {"twistnet_tiny_pretrained-full-s1", "twistnet_tiny_scratch-full-s2"}
    compared = run_mlexp(["compare", "--experiment", "own-sweep", "--features", "--out", str(tmp_path / "cmp"),
                          "--log-run", "false"], env, project)
    assert compared.returncode == 0, compared.stdout[-2000:] + compared.stderr[-2000:]
    [features] = json.loads((tmp_path / "cmp" / "compare.json").read_text())["features"]
    assert features["backbone"] == "twistnet_tiny" and not features["problem"]
    assert features["layers"] == ["stem", "layer1", "twist", "layer2", "pre_logits"]

    # The ablation variant starts from the full network's file, partially, and says so.
    ablation = run_mlexp(["train", "--backbone", "mymodels:twistnet_tiny_no_twist", "--init", "pretrained",
                          "--weights-from", "twistnet_tiny", "--weights-strict", "false", *SMALL,
                          "--experiment", "own-ablation"], env, project)
    assert ablation.returncode == 0, ablation.stderr[-3000:]
    assert f"exported by run {pretrain_run}" in ablation.stdout
    assert "mlexp: weights: loaded " in ablation.stdout and "in the file unused: twist.*" in ablation.stdout
    import sys

    sys.path.insert(0, str(project))
    try:
        import mymodels

        variant = mymodels.twistnet_tiny_no_twist(num_classes=10).state_dict()
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("mymodels", None)
    state = load_file(exported)
    loaded = [k for k in variant if k in state and state[k].shape == variant[k].shape]
    run = only_run(client, "own-ablation")
    assert (run.data.params["weights_loaded"], run.data.params["weights_new"], run.data.params["weights_unused"]) == \
        (str(len(loaded)), str(len(variant) - len(loaded)), str(len(state) - len(loaded)))
    assert "weights/load_report.json" in artifact_paths(client, run.info.run_id)

    # A foundation checkpoint saved inside an encoder, with a decoder the network does not have.
    torch.save({"model": {**{f"encoder.{k}": v for k, v in state.items()}, "decoder.proj.weight": torch.ones(2, 2)}},
               project / "mae.pth")
    mapped = run_mlexp(["train", "--backbone", "mymodels:twistnet_tiny", "--init", "pretrained", "--weights", "mae.pth",
                        "--weights-key-map", "encoder.=", "--weights-strict", "false", *SMALL, "--log-models", "false",
                        "--experiment", "own-mae"], env, project)
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    assert "from mae.pth; 1 in the file unused: decoder.*" in mapped.stdout
    mae_run = only_run(client, "own-mae")
    assert (mae_run.data.params["weights_loaded"], mae_run.data.params["weights_unused"]) == (str(len(state)), "1")
    report = json.loads(Path(client.download_artifacts(mae_run.info.run_id, "weights/load_report.json",
                                                       str(tmp_path / "mae"))).read_text())
    assert report["unused"] == ["decoder.proj.weight"] and report["new"] == []

    # Gradual unfreezing by the user's own stage patterns, one phase per epoch.
    gradual = run_mlexp(["train", "--backbone", "mymodels:twistnet_tiny", "--strategy", "gradual",
                         "--unfreeze-patterns", "fc;layer2|twist;.*", "--gradual-patience", "0", *SMALL, "--epochs", "3",
                         "--log-models", "false", "--experiment", "own-gradual"], env, project)
    assert gradual.returncode == 0, gradual.stderr[-3000:]
    full = {name: tensor.numel() for name, tensor in state.items() if not name.endswith(("running_mean",
                                                                                          "running_var", "num_batches_tracked"))}
    head = 4 * 16 * 10 + 10  # fc for 10 classes (the file's is for the synthetic set's classes)
    middle = sum(n for name, n in full.items() if name.startswith(("layer2.", "twist.")))
    body = sum(n for name, n in full.items() if not name.startswith("fc."))
    gradual_run = only_run(client, "own-gradual")
    curve = [m.value for m in sorted(client.get_metric_history(gradual_run.info.run_id, "train/trainable_params"),
                                     key=lambda m: m.step)]
    assert curve == [head, head + middle, head + body]
    assert gradual_run.data.params["strategy_phases"].count(";") == 2

    # A killed run of the user's network resumes in its run.
    killed = run_mlexp(["train", "--backbone", "mymodels:twistnet_tiny", "--init", "scratch", *SMALL,
                        "--epochs", "2", "--log-models", "false", "--experiment", "own-killed"],
                       dict(env, MLEXP_FAULT="step=30"), project)
    assert killed.returncode == -signal.SIGKILL
    killed_id = only_run(client, "own-killed").info.run_id
    resumed = run_mlexp(["train", "--resume", killed_id], env, project)
    assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr[-3000:]
    assert client.get_run(killed_id).info.status == "FINISHED"

    # Its logged model, used from a folder without mymodels.py and with nothing of it on PYTHONPATH.
    elsewhere = tmp_path / "elsewhere"
    data = write_digits_folder(elsewhere / "digits")
    evaluated = run_mlexp(["evaluate", "--model", f"runs:/{run.info.run_id}", "--data", str(data / "test"),
                           "--experiment", "own-evaluate"], env, elsewhere)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    [model] = [m for m in client.search_logged_models([run.info.experiment_id]) if m.name == "best"]
    model_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}", dst_path=str(tmp_path / "model"), tracking_uri=uri))
    assert (model_dir / "artifacts" / "classifier" / "code" / "mymodels.py").is_file()
    images = np.stack([np.full((8, 8, 3), value, np.uint8) for value in (0, 128)])
    served = served_predictions(model_dir, images, env, elsewhere)
    assert served.shape == (2, 10) and np.allclose(served.sum(axis=1), 1.0, atol=1e-4)
