"""Weight sources (file, weights dir, runs:/, models:/, timm) and checked loading, on real timm and MLflow."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.models.build import build_backbone, create_model
from mlexp.models.catalogue import resolve_backbone
from mlexp.models.preflight import preflight
from mlexp.models.weight_sources import file_sha256, locate_weights, reachable

HEAD = ("fc.weight", "fc.bias")


@pytest.fixture(autouse=True)
def _no_weights_dir(monkeypatch, tmp_path):
    """No stray ./weights/ or $MLEXP_WEIGHTS_DIR: each test says where its weights are."""
    monkeypatch.delenv("MLEXP_WEIGHTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


def donor_state(name: str = "resnet18_pretrained", num_classes: int = 5, img_size: int = 32,
                seed: int = 123) -> dict[str, torch.Tensor]:
    """The state dict of a differently seeded model of the same arch, other class count."""
    torch.manual_seed(seed)
    model = create_model(resolve_backbone(name), num_classes=num_classes, img_size=img_size)
    for buffer_name, buffer in model.named_buffers():  # make BN statistics distinguishable too
        if buffer.is_floating_point():
            buffer.add_(torch.rand_like(buffer))
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def assert_loaded_from(model: torch.nn.Module, donor: dict[str, torch.Tensor], head=HEAD) -> None:
    state = model.state_dict()
    for key, tensor in donor.items():
        if key not in head:
            assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_file_loads_every_backbone_tensor_and_reinits_head(tmp_path, fmt):
    donor = donor_state()
    path = tmp_path / f"donor.{fmt}"
    if fmt == "safetensors":
        save_file(donor, path)
    else:  # a training checkpoint: wrapped and saved from a DDP-wrapped model
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in donor.items()}}, path)
    spec = resolve_backbone("resnet18")
    located = locate_weights(spec, str(path))  # what a caller may do before opening a run
    built = build_backbone(spec, num_classes=10, img_size=32, weights=located if fmt == "pth" else str(path))
    assert built.weights_source == "file" and built.weights_path == str(path.resolve())
    assert built.weights_sha256 == file_sha256(path)
    assert built.loaded_tensors == len(donor) - 2
    assert_loaded_from(built.model, donor)
    assert built.model.fc.weight.shape == (10, 512)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.complex64])
def test_weights_of_the_wrong_kind_are_refused_not_cast(tmp_path, dtype):
    donor = donor_state()
    wrong = {key: (value * 10).to(dtype) if value.is_floating_point() else value for key, value in donor.items()}
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(MlexpError, match=rf"tensor\(s\) are {str(dtype).removeprefix('torch.')} where resnet18 has "
                                         "floating-point ones") as raised:
        build_backbone(resolve_backbone("resnet18"), 10, 32, str(tmp_path / "wrong.safetensors"))
    assert "\n" not in str(raised.value) and "conv1.*" in str(raised.value)
    # BatchNorm's integer counters stay integers: the donor's own file loads
    save_file(donor, tmp_path / "right.safetensors")
    assert build_backbone(resolve_backbone("resnet18"), 10, 32, str(tmp_path / "right.safetensors")).loaded_tensors


def test_same_class_count_keeps_the_classifier(tmp_path):
    donor = donor_state(num_classes=10)
    save_file(donor, tmp_path / "w.safetensors")
    built = build_backbone(resolve_backbone("resnet18"), 10, 32, weights=str(tmp_path / "w.safetensors"))
    assert built.loaded_tensors == len(donor)
    assert torch.equal(built.model.fc.weight, donor["fc.weight"])


@pytest.mark.parametrize("name, donor_size", [("deit_small_pretrained", 64), ("swin_small_pretrained", 64)])
def test_transformer_weights_from_another_image_size_are_resampled(tmp_path, name, donor_size):
    """A 64 px checkpoint into a 32 px model: timm's adapter resamples the position embedding
    (ViT) or relative-position tables (Swin, window 8 -> 4); everything else is copied."""
    donor = donor_state(name, img_size=donor_size)
    save_file(donor, tmp_path / "w.safetensors")
    built = build_backbone(resolve_backbone(name), 3, 32, weights=str(tmp_path / "w.safetensors"))
    state = built.model.state_dict()
    head = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias")
    resized = [k for k in donor if k in state and k not in head and donor[k].shape != state[k].shape]
    assert resized and all(k == "pos_embed" or k.endswith("relative_position_bias_table") for k in resized)
    same = {k: v for k, v in donor.items() if k in state and k not in head and v.shape == state[k].shape}
    assert_loaded_from(built.model, same, head=head)
    assert built.loaded_tensors == len(same) + len(resized)


@pytest.mark.parametrize("case", ["nothing", "other-arch", "missing", "wrong-shape", "pickled-module"])
def test_weights_that_do_not_fit_are_an_error(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    if case == "nothing":
        save_file({"encoder.weight": torch.zeros(3, 3)}, path)
    elif case == "other-arch":
        save_file(donor_state("resnet50_pretrained"), path)
    elif case == "missing":
        donor = donor_state()
        del donor["layer4.1.bn2.weight"]
        save_file(donor, path)
    elif case == "wrong-shape":
        donor = donor_state()
        donor["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
        save_file(donor, path)
    else:
        path = tmp_path / "model.pth"
        torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(MlexpError) as info:
        build_backbone(resolve_backbone("resnet18"), 10, 32, weights=str(path))
    message = str(info.value)
    expected = {"nothing": "match none", "other-arch": "do not fit", "missing": "1 tensors missing",
                "wrong-shape": "other shapes",
                "pickled-module": "weights_only"}[case]
    assert expected in message and "\n" not in message


def test_weights_dir_is_found_without_any_flag(tmp_path, monkeypatch):
    folder = tmp_path / "my-weights"
    folder.mkdir()
    donor = donor_state()
    save_file(donor, folder / "resnet18.safetensors")
    monkeypatch.setenv("MLEXP_WEIGHTS_DIR", str(folder))
    built = build_backbone(resolve_backbone("resnet18_pretrained"), 10, 32)
    assert built.weights_source == "weights-dir"
    assert built.weights_path == str((folder / "resnet18.safetensors").resolve())
    assert_loaded_from(built.model, donor)


def test_default_weights_dir_is_dot_weights(tmp_path):
    (tmp_path / "weights").mkdir()
    donor = donor_state()
    torch.save(donor, tmp_path / "weights" / "resnet18.pth")  # cwd is tmp_path
    built = build_backbone(resolve_backbone("resnet18"), 10, 32)
    assert built.weights_source == "weights-dir" and built.weights_path.endswith("resnet18.pth")
    assert_loaded_from(built.model, donor)


def _logged_run(tmp_path: Path, donor: dict) -> str:
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("weights")).info.run_id
    folder = tmp_path / "upload"
    folder.mkdir()
    save_file(donor, folder / "model.safetensors")
    client.log_artifact(run_id, str(folder / "model.safetensors"), "model")
    return run_id


def test_weights_from_mlflow_run_artifacts_and_registered_models(sqlite_uri, tmp_path):
    """One real SQLite store (creating one costs seconds): runs:/ file and folder, models:/ by
    version and by alias, and an unknown run."""
    donor = donor_state()
    run_id = _logged_run(tmp_path, donor)
    uri = f"runs:/{run_id}/model/model.safetensors"
    built = build_backbone(resolve_backbone("resnet18"), 10, 32, weights=uri)
    assert built.weights_source == "mlflow-run" and built.weights_path.endswith("model.safetensors")
    assert built.weights_sha256 == file_sha256(tmp_path / "upload" / "model.safetensors")
    assert_loaded_from(built.model, donor)
    # The artifact folder works too: the one .safetensors inside is used.
    folder_built = build_backbone(resolve_backbone("resnet18"), 10, 32, weights=f"runs:/{run_id}/model")
    assert folder_built.weights_sha256 == built.weights_sha256

    client = MlflowClient()
    client.create_registered_model("resnet18-digits")
    version = client.create_model_version("resnet18-digits", source=f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("resnet18-digits", "champion", version.version)
    for model_uri in (f"models:/resnet18-digits/{version.version}", "models:/resnet18-digits@champion"):
        registered = build_backbone(resolve_backbone("resnet18"), 10, 32, weights=model_uri)
        assert registered.weights_source == "mlflow-model"
        assert registered.weights_sha256 == built.weights_sha256
        assert_loaded_from(registered.model, donor)

    with pytest.raises(MlexpError, match="could not download"):
        build_backbone(resolve_backbone("resnet18"), 10, 32, weights="runs:/0123456789abcdef/model")


def test_timm_weights_already_in_the_hub_cache_load_offline(tmp_path, monkeypatch):
    """Source 3 without network: a file timm downloaded earlier sits in the Hugging Face cache."""
    import huggingface_hub.constants

    repo = get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    cache = tmp_path / "hf-cache"
    repo_dir, commit = cache / f"models--{repo.replace('/', '--')}", "0" * 40
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    donor = donor_state(num_classes=1000)
    save_file(donor, snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = build_backbone(resolve_backbone("resnet18_pretrained"), 10, 32)
    assert built.weights_source == "timm" and built.weights_path == str(snapshot / "model.safetensors")
    assert built.loaded_tensors == len(donor) - 2
    assert_loaded_from(built.model, donor)


def test_offline_without_weights_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MlexpError) as info:
        build_backbone(resolve_backbone("deit_small_pretrained"), 10, 32)
    assert time.monotonic() - start < 2.0
    message = str(info.value)
    assert "\n" not in message
    for words in ("--weights", "MLEXP_WEIGHTS_DIR", "./weights/", "deit_small.safetensors", "network",
                  "HF_HUB_OFFLINE"):
        assert words in message


def test_unreachable_hub_is_detected_by_a_short_probe(monkeypatch):
    """Without HF_HUB_OFFLINE, mlexp probes the hub instead of letting timm hang ~46 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{closed_port}")
    start = time.monotonic()
    with pytest.raises(MlexpError, match="does not answer"):
        build_backbone(resolve_backbone("resnet50_pretrained"), 10, 32)
    assert time.monotonic() - start < 2.0


def test_probe_gives_up_within_its_timeout():
    """A host that accepts the connection and then never answers (as intercepting proxies do)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever replies
        start = time.monotonic()
        assert not reachable(f"https://127.0.0.1:{silent.getsockname()[1]}/api/models", timeout=0.3)
        assert time.monotonic() - start < 1.0


# --- preflight: the same verdicts, before torch and timm are needed -----------------------------


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache and torch hub dir, no offline flags set: each test sets its own."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return cache


def put_in_hub_cache(cache: Path, repo: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Lay a file out as huggingface_hub caches a download: models--ORG--NAME/snapshots/COMMIT/."""
    repo_dir, commit = cache / f"models--{repo.replace('/', '--')}", "0" * 40
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    save_file(tensors, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def test_preflight_offline_gives_the_same_error_as_the_full_path(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(backbone="deit_small_pretrained")
    with pytest.raises(MlexpError) as early:
        preflight(cfg)
    with pytest.raises(MlexpError) as late:
        locate_weights(resolve_backbone(cfg.backbone), None)
    assert str(early.value) == str(late.value) and "HF_HUB_OFFLINE is set" in str(early.value)


@pytest.mark.parametrize("where", ["hub-cache", "torch-hub", "weights-dir"])
def test_preflight_offline_passes_where_the_full_path_finds_weights(empty_caches, tmp_path, monkeypatch, where):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = resolve_backbone("resnet18_pretrained")
    donor = donor_state(num_classes=1000)
    if where == "hub-cache":
        expected = put_in_hub_cache(empty_caches, get_pretrained_cfg("resnet18").hf_hub_id, donor)
    elif where == "torch-hub":  # a timm download from before the hub era, by URL
        expected = tmp_path / "torch-home" / "hub" / "checkpoints" / Path(spec.timm_weights.url).name
        expected.parent.mkdir(parents=True)
        torch.save(donor, expected)
    else:
        (tmp_path / "weights").mkdir()
        expected = tmp_path / "weights" / "resnet18.pth"
        torch.save(donor, expected)
    preflight(TrainConfig(backbone="resnet18"))
    assert locate_weights(spec, None).path.resolve() == expected.resolve()


def test_preflight_honours_transformers_offline_as_huggingface_hub_does(empty_caches, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(MlexpError, match="TRANSFORMERS_OFFLINE is set.*unset TRANSFORMERS_OFFLINE"):
        preflight(TrainConfig(backbone="swin_small"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # huggingface_hub: a set HF_HUB_OFFLINE decides
    preflight(TrainConfig(backbone="swin_small"))  # online: left to the full path (network probe)


@pytest.mark.parametrize("values, error", [
    (dict(backbone="resnt50_scratch"), "did you mean resnet50_scratch"),
    (dict(backbone="resnet50_scratch", init="pretrained"), "contradicts"),
    (dict(backbone="resnet50_scratch", weights="w.pth"), "trains from scratch"),
    (dict(backbone="resnet50", weights="nope.safetensors"), "--weights nope.safetensors: no such file"),
    (dict(backbone="resnet50", weights="https://example.com/w.pth"), "expected a local"),
    (dict(backbone="resnet50", weights="empty-dir"), "no .safetensors or .pth file in it"),
    (dict(backbone="resnt50_scratch", dry_run=True), "did you mean"),
    (dict(backbone="vgg16"), "HF_HUB_OFFLINE"),
    (dict(backbone="resnet50", weights="runs:/0123456789abcdef/model"), None),  # MLflow: the full path's job
    (dict(backbone="resnet50", weights="w.pth"), None),
    (dict(backbone="resnet50", dry_run=True), None),  # a dry run loads no weights
    (dict(backbone="resnet50", resume="0123456789abcdef"), None),  # the run's own config decides
    (dict(backbone="resnet50_scratch"), None),
])
def test_preflight_verdicts(empty_caches, tmp_path, monkeypatch, values, error):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "w.pth").write_bytes(b"not read by preflight")
    (tmp_path / "empty-dir").mkdir()
    cfg = TrainConfig(**values)
    if error is None:
        preflight(cfg)
    else:
        with pytest.raises(MlexpError, match=re.escape(error)):
            preflight(cfg)


def test_torch_hub_dir_mirrors_torch(tmp_path, monkeypatch):
    from mlexp.models.weight_sources import _torch_hub_dir_from_env

    for torch_home, xdg in ((None, None), (None, str(tmp_path / "xdg")), (str(tmp_path / "th"), str(tmp_path))):
        for name, value in (("TORCH_HOME", torch_home), ("XDG_CACHE_HOME", xdg)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert _torch_hub_dir_from_env() == torch.hub.get_dir()
