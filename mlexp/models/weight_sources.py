"""Where pretrained weights come from: one decision tree, first match wins.

  1. explicit `--weights`: a local .safetensors/.pth/.pt file (or a folder holding one),
     runs:/RUN_ID/path or models:/NAME/VERSION|@ALIAS from the run's own tracking store (never
     MLflow's global default, which would create ./mlflow.db), downloaded to a temporary folder
     that lives exactly as long as the WeightsFile naming it;
  2. the weights folder ($MLEXP_WEIGHTS_DIR, else ./weights/): <arch>, <catalogue name> or
     <timm name> (or the backbone --weights-from names), each .safetensors, .pt or .pth, then
     <name>_*.safetensors|.pt|.pth (a file such as twistnet18_imagenet.pt);
  3. timm's own pretrained weights (Hugging Face Hub cache, else a download).

Without network and without local weights this fails in well under 2 s: timm would wait ~46 s
on an unreachable hub, so the hub is probed first with a short (1.5 s) HTTP request. The CLI's
pre-check `preflight` is this same tree run with download=False (so the two cannot disagree);
with the hub offline (HF_HUB_OFFLINE) it decides before torch and timm are imported (~3 s):
this module imports neither at module level, and the catalogue knows each arch's hub repo
without timm. Loading the located file is `mlexp.models.weight_files`.
"""

# Imported where used: `mlflow`, `huggingface_hub` and `torch`, because `mlexp --help` and
# the option checks import this module; each source's library loads only when weights come from it.
from __future__ import annotations

import os
import posixpath
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mlexp.errors import MlexpError
from mlexp.models.catalogue import BackboneSpec, TimmSource, timm_source
from mlexp.tracking.server import file_sha256

PROBE_TIMEOUT_S = 1.5


@dataclass(frozen=True)
class WeightsFile:
    """A local weights file and where it came from."""

    path: Path
    source: str  # "file" | "mlflow-run" | "mlflow-model" | "weights-dir" | "timm"
    sha256: str
    label: str  # what to call it in messages (the URI the user typed, or the path)


def weights_dir() -> Path:
    """The folder searched automatically (and where exported weights go)."""
    return Path(os.environ.get("MLEXP_WEIGHTS_DIR") or "weights")


def default_export_path(spec: BackboneSpec) -> Path:
    """Where `--export-weights` should write, so later pretrained runs of this arch find it."""
    return weights_dir() / f"{spec.arch}.safetensors"


WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth")


def candidate_filenames(spec: BackboneSpec, weights_from: str | None = None) -> list[str]:
    """The weights folder's search order: exact names first, then `<name>_*` patterns."""
    stems = (weights_from,) if weights_from else (spec.arch, spec.name, spec.timm_name)
    exact = [f"{stem}{suffix}" for stem in stems for suffix in WEIGHTS_SUFFIXES]
    patterns = [f"{stem}_*{suffix}" for stem in stems for suffix in WEIGHTS_SUFFIXES]
    return list(dict.fromkeys(exact + patterns))


# --- locating ----------------------------------------------------------------------------


def scratch_weights_error(spec: BackboneSpec) -> MlexpError:
    return MlexpError(f"--weights was given but {spec.name} trains from scratch; drop --weights "
                      f"or use --init pretrained")


def locate_weights(spec: BackboneSpec, weights: str | None, tracking_uri: str | None = None,
                   download: bool = True, weights_from: str | None = None) -> WeightsFile | None:
    """The local file to load for a pretrained spec, from the first source that has one.
    `tracking_uri`: the store that runs:/ and models:/ weights come from (default: the one a
    run would use, `mlexp.tracking.default_tracking_uri()`).

    `download=False` (the pre-check): the same tree, fetching, hashing and probing nothing; the
    same MlexpError where that much decides (no such file, hub offline and nothing cached),
    runs:/ and models:/ left unchecked (they need MLflow); returns None."""
    if weights:
        return explicit_weights(weights, tracking_uri, download)
    path = _weights_dir_file(spec, weights_from)
    if path is not None:
        return _local_weights(path.resolve(), "weights-dir", str(path), download)
    if weights_from or spec.plugin:  # no timm weights to fall back on: say where we looked
        raise MlexpError(f"no pretrained weights for {spec.name}: none given and none in {weights_dir()}/ (looked "
                         f"for {', '.join(candidate_filenames(spec, weights_from))}). {_ways_to_provide(spec, False)}")
    return timm_weights(spec, download)


def _local_weights(path: Path, source: str, label: str, download: bool = True) -> WeightsFile | None:
    """A WeightsFile for a file already on disk; None when only checking (hashing costs ~1 s per GB)."""
    return WeightsFile(path, source, file_sha256(path), label) if download else None


def _weights_dir_file(spec: BackboneSpec, weights_from: str | None = None) -> Path | None:
    """The first name in the search order that exists; a pattern must match exactly one file."""
    folder = weights_dir()
    for name in candidate_filenames(spec, weights_from):
        found = sorted(path for path in folder.glob(name) if path.is_file()) if "*" in name else \
            [folder / name] if (folder / name).is_file() else []
        if len(found) > 1:
            raise MlexpError(f"several weights files in {folder}/ match {name} ({', '.join(p.name for p in found[:4])}): "
                             f"name one with --weights")
        if found:
            return found[0]
    return None


def explicit_weights(weights: str, tracking_uri: str | None = None,
                     download: bool = True) -> WeightsFile | None:
    """--weights: a local file or folder, runs:/RUN_ID/path, or models:/NAME/VERSION|@ALIAS
    (those two from `tracking_uri`, see locate_weights)."""
    local = _explicit_local_path(weights)
    if local is not None:
        path = _pick_weights_file(local, weights) if local.is_dir() else local
        return _local_weights(path.resolve(), "file", weights, download)
    if not download:
        return None
    if tracking_uri is None:
        from mlexp.tracking import default_tracking_uri  # lazy: importing this module stays light

        tracking_uri = default_tracking_uri()
    return _mlflow_weights(weights, tracking_uri)


def _mlflow_weights(uri: str, tracking_uri: str) -> WeightsFile:
    """Download runs:/ or models:/ weights into a fresh temporary folder. The folder is removed
    at once if anything fails, else when the returned WeightsFile is garbage-collected (after
    build_backbone has loaded it) or, at the latest, when the interpreter exits."""
    folder = Path(tempfile.mkdtemp(prefix="mlexp-weights-"))
    try:
        downloaded = Path(_download_mlflow(uri, tracking_uri, folder))
        path = _pick_weights_file(downloaded, uri) if downloaded.is_dir() else downloaded
        found = WeightsFile(path, "mlflow-run" if uri.startswith("runs:/") else "mlflow-model",
                            file_sha256(path), uri)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(found, shutil.rmtree, folder, ignore_errors=True)
    return found


def _explicit_local_path(weights: str) -> Path | None:
    """The existing local file or folder --weights names; None for runs:/ and models:/ URIs."""
    if weights.startswith(("runs:/", "models:/")):
        return None
    if "://" in weights and not weights.startswith("file://"):
        raise MlexpError(f"--weights {weights!r}: expected a local .safetensors/.pth file, "
                         f"runs:/RUN_ID/PATH or models:/NAME/VERSION (or models:/NAME@ALIAS)")
    local = Path(weights.removeprefix("file://")).expanduser()
    if not local.exists():
        raise MlexpError(f"--weights {weights}: no such file")
    return local


def _download_mlflow(uri: str, tracking_uri: str, folder: Path) -> str:
    """Download a runs:/ or models:/ URI from `tracking_uri` into `folder`; the local path."""
    import mlflow  # only this source needs it; keeps `import mlexp.models.catalogue` light

    try:
        source = _model_download_uri(uri, tracking_uri) if uri.startswith("models:/") else uri
        return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder),
                                                   tracking_uri=tracking_uri)
    except Exception as exc:  # MlflowException, OSError, requests errors: all a bad URI or store
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MlexpError(f"--weights {uri}: could not download it from MLflow "
                         f"({tracking_uri}): {first_line}") from exc


def _model_download_uri(uri: str, tracking_uri: str) -> str:
    """Where a models:/NAME/VERSION|@ALIAS[/path] URI's files are, asked of the registry of
    `tracking_uri` ($MLFLOW_REGISTRY_URI, else the tracking store, as MlflowClient decides).
    MLflow's own models:/ download uses the global registry whatever tracking_uri it is given."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=tracking_uri)
    model_uri, sub_path = ModelsArtifactRepository.split_models_uri(uri)
    found = get_model_name_and_version(client, model_uri)
    if len(found) == 1:  # models:/<logged model id> (MLflow 3)
        base = client.get_logged_model(found[0]).artifact_location
    else:
        base = client.get_model_version_download_uri(*found)
    return posixpath.join(base, sub_path) if sub_path else base


def _pick_weights_file(folder: Path, label: str) -> Path:
    """The one weights file inside a folder (a downloaded artifact dir or registered model)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for suffixes in ((".safetensors",), (".pth", ".pt", ".bin")):
        matches = [p for p in files if p.suffix in suffixes]
        if len(matches) == 1:
            return matches[0]
        preferred = [p for p in matches if p.stem in ("model", "weights", "pytorch_model")]
        if len(preferred) == 1:
            return preferred[0]
        if matches:
            names = ", ".join(str(p.relative_to(folder)) for p in matches[:5])
            raise MlexpError(f"--weights {label}: several weights files ({names}); name one of them "
                             f"in the path")
    found = ", ".join(str(p.relative_to(folder)) for p in files[:5]) or "nothing"
    raise MlexpError(f"--weights {label}: no .safetensors or .pth file in it (found {found}); log the "
                     f"model's state dict as model.safetensors next to it")


# --- timm's own weights, or fail fast ------------------------------------------------------


def timm_weights(spec: BackboneSpec, download: bool = True) -> WeightsFile | None:
    """timm's pretrained file from the HF cache, else downloaded, else a fast one-line error.
    `download=False`: only whether it could be had, by the offline flags (no network probe)."""
    cfg = spec.timm_weights if spec.timm_weights is not None else timm_source(spec.timm_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise MlexpError(f"timm has no pretrained weights for {spec.timm_name}: "
                         f"{_ways_to_provide(spec, network=False)}")
    cached = _cached_timm_file(cfg)
    if cached is not None:
        return _local_weights(cached, "timm", str(cached), download)
    if unreachable := _offline_reason(cfg, probe=download):
        raise _unavailable_error(spec, unreachable)
    if not download:
        return None
    try:
        path = _download_timm_file(cfg)
    except Exception as exc:  # hub/HTTP errors of many kinds; the message is what matters
        raise MlexpError(f"downloading timm weights for {spec.timm_name} failed: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                         f"{_ways_to_provide(spec)}") from exc
    return WeightsFile(path, "timm", file_sha256(path), str(path))


def _unavailable_error(spec: BackboneSpec, unreachable: str) -> MlexpError:
    return MlexpError(f"no pretrained weights for {spec.name}: none given, none in {weights_dir()}/ "
                      f"(looked for {', '.join(candidate_filenames(spec)[:2])}), and timm cannot download "
                      f"them ({unreachable}). {_ways_to_provide(spec)}")


def _ways_to_provide(spec: BackboneSpec, network: bool = True) -> str:
    ways = (f"Provide weights with --weights FILE|runs:/RUN_ID/PATH|models:/NAME/VERSION, or put "
            f"{spec.arch}.safetensors (or .pt/.pth) in $MLEXP_WEIGHTS_DIR (default ./weights/)")
    if network:
        ways += ", or enable network access so timm can download them"
        flag = _hub_offline_flag()
        ways += f" (unset {flag})" if flag else ""
    scratch = spec.name.replace("_pretrained", "_scratch") if spec.name.endswith("_pretrained") else None
    return ways + (f"; or train {scratch} from scratch." if scratch else "; or use --init scratch.")


def _hub_repo(cfg) -> tuple[str, str | None]:
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return repo, revision or None


def _hub_filenames(cfg) -> list[str]:
    return [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]


def _cached_timm_file(cfg: TimmSource) -> Path | None:
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache  # ~0.1 s; reads HF_HUB_CACHE / HF_HOME

        repo, revision = _hub_repo(cfg)
        for filename in _hub_filenames(cfg):
            cached = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(cached, str):
                return Path(cached)
    if cfg.url:
        cached = Path(torch_hub_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached.is_file():
            return cached
    return None


def torch_hub_dir() -> str:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, where TORCH_HOME defaults
    to $XDG_CACHE_HOME/torch (~/.cache/torch). Once torch is loaded, torch's own answer (which
    honours torch.hub.set_dir)."""
    hub = sys.modules.get("torch.hub")
    return hub.get_dir() if hub is not None else _torch_hub_dir_from_env()


def _torch_hub_dir_from_env() -> str:
    cache = os.getenv("XDG_CACHE_HOME", "~/.cache")
    return os.path.join(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch"))), "hub")


def _download_timm_file(cfg: TimmSource) -> Path:
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        repo, revision = _hub_repo(cfg)
        filenames = _hub_filenames(cfg)
        for filename in filenames:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision))
            except EntryNotFoundError:
                if filename == filenames[-1]:
                    raise
    import torch.hub

    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(cfg.url, str(target), progress=False)
    return target


def _hub_offline_flag() -> str | None:
    """The variable that puts huggingface_hub offline, read as huggingface_hub.constants reads it
    (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE; 1/ON/YES/TRUE), but now rather than at import."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:  # a non-empty HF_HUB_OFFLINE decides, even "0" (huggingface_hub's `or`)
            return name if value.strip().upper() in {"1", "ON", "YES", "TRUE"} else None
    return None


def _offline_reason(cfg: TimmSource, probe: bool = True) -> str | None:
    """Why timm cannot download right now (None if it may): HF_HUB_OFFLINE, or a failed probe
    (skipped with probe=False, the pre-check: it costs up to 1.5 s and the full path probes)."""
    flag = _hub_offline_flag() if cfg.hf_hub_id else None
    if flag:
        return f"{flag} is set"
    hub = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/") + "/api/models"
    url = hub if cfg.hf_hub_id else cfg.url
    if probe and not reachable(url):
        return f"{urlparse(url).netloc} does not answer"
    return None


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Does `url` answer HTTP (any status) within `timeout`? A bare TCP connect is not enough:
    sandboxes and intercepting proxies accept connections and then hang or fail TLS. The probe
    runs in a thread, so a slow DNS lookup (which ignores socket timeouts) is bounded too."""
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:  # the server answered, just not 2xx: it is there
            result.append(True)
        except (OSError, ValueError):  # URLError, TLS errors, timeouts, refused connections
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
