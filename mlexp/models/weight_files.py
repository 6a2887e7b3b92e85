"""Loading a located weights file into a model, so that a bad file can never pass.

Loading checks every tensor: all backbone tensors must come from the file with matching
shapes, or it is an MlexpError, never a silent random init. Only the classifier may be left
at its fresh initialisation, when its shape differs (another class count). With
--weights-strict false (an ablation variant, a foundation checkpoint with a decoder) every
tensor whose name and shape match loads and the rest stay new, said out loud in a LoadReport.

Which file to load is `mlexp.models.weight_sources`. Importing this module imports neither torch
nor timm: each function imports them itself (tests/commands/test_fast_failures.py holds it to that).
"""

# Imported where used: `torch`, `safetensors`, `timm` and `mlexp.models.heads` (torch), so that
# this module stays importable beside the light option-check modules (catalogue, weight_sources).
from __future__ import annotations

import importlib
import inspect
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mlexp.config import key_map_pairs
from mlexp.errors import MlexpError

if TYPE_CHECKING:
    import torch

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
# Buffers that checkpoints may carry or lack without changing the network.
_IGNORABLE_SUFFIXES = ("num_batches_tracked", "relative_position_index", "attn_mask")


def read_state_dict(path: Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors, or .pth/.pt/.bin loaded safely
    (weights_only); unwraps {"model"|"state_dict"|"model_state_dict": ...} checkpoints and
    strips DDP/torch.compile prefixes."""
    label = label or str(path)
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MlexpError(f"weights {label}: not a readable .safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MlexpError(f"weights {label}: torch.load(weights_only=True) refused it ({first}); "
                             f"save model.state_dict() (or use .safetensors) instead of a pickled "
                             f"model") from exc
    for _ in range(2):  # {"model": {"state_dict": ...}} also happens
        if isinstance(state, dict):
            for key in _WRAPPER_KEYS:
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
    if not isinstance(state, dict):
        raise MlexpError(f"weights {label}: expected a state dict, found a {type(state).__name__}")
    tensors = {_strip_prefixes(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise MlexpError(f"weights {label}: contains no tensors")
    return tensors


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def timm_filter_fn(timm_name: str) -> Callable | None:
    """timm's checkpoint adapter for this arch (resamples ViT position embeddings and Swin
    relative-position tables to the model's size, converts torchvision VGG classifiers)."""
    from timm.models import model_entrypoint, split_model_name_tag

    module = importlib.import_module(model_entrypoint(split_model_name_tag(timm_name)[0]).__module__)
    return getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_fn", None)


@dataclass
class LoadReport:
    """What a weights file gave the network: tensor names loaded, left new, and unused in the file."""

    label: str
    loaded: list[str]
    new: list[str]  # the network's tensors the file did not give (freshly initialised)
    unused: list[str]  # the file's tensors the network did not take
    classifier: list[str] = field(default_factory=list)
    classifier_rule: str = ""

    def summary(self) -> str:
        """`loaded 118 of 130 tensors from FILE; 12 new: stci.*; 3 in the file unused: decoder.*`"""
        text = f"loaded {len(self.loaded)} of {len(self.loaded) + len(self.new)} tensors from {self.label}"
        if self.new:
            text += f"; {len(self.new)} new: {name_groups(self.new)}"
        if self.unused:
            text += f"; {len(self.unused)} in the file unused: {name_groups(self.unused)}"
        return text

    def to_dict(self) -> dict:
        return {"file": self.label, "loaded": self.loaded, "new": self.new, "unused": self.unused,
                "classifier": self.classifier, "classifier_rule": self.classifier_rule}


def name_groups(names: list[str], shown: int = 4) -> str:
    """Tensor names by their first component: `stci.*, head.*` (the first few, then a count)."""
    groups = list(dict.fromkeys(name.split(".")[0] + (".*" if "." in name else "") for name in names))
    more = f" and {len(groups) - shown} more" if len(groups) > shown else ""
    return ", ".join(groups[:shown]) + more


def rename_keys(state: dict, key_map: list[tuple[str, str]]) -> dict:
    """Apply the first matching prefix rename to each name; other names stay as they are."""
    renamed = {}
    for key, value in state.items():
        for old, new in key_map:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def load_weights(model: torch.nn.Module, path: Path, timm_name: str, label: str | None = None,
                 strict: bool = True, key_map: str | None = None) -> LoadReport:
    """Load the file into `model`, checked (`strict`) or as far as it fits; returns what happened."""
    from mlexp.models.heads import find_classifier

    label = label or str(path)
    state = rename_keys(read_state_dict(path, label), key_map_pairs(key_map))
    filter_fn = timm_filter_fn(timm_name)
    if filter_fn is not None:
        try:
            takes_model = len(inspect.signature(filter_fn).parameters) > 1
            state = filter_fn(state, model) if takes_model else filter_fn(state)
        except Exception as exc:  # the adapter choked: the file is not this arch's
            raise MlexpError(f"weights {label} do not fit {timm_name}: timm could not adapt them "
                             f"({type(exc).__name__}: {exc})") from exc
    check_kinds(model, state, label, timm_name)
    state = adapt_input_convs(model, state)
    head, rule = find_classifier(model)
    loaded = (load_checked if strict else load_matching)(model, state, tuple(head), label, timm_name)
    taken = set(loaded)
    return LoadReport(label, loaded, [k for k in model.state_dict() if k not in taken],
                      [k for k in state if k not in taken], head, rule)


def adapt_input_convs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RGB weights for a model built for other input channels (--in-chans): each stem filter
    whose file has 3 input channels where the model has N is adapted as timm adapts its own
    pretrained stems (timm's adapt_input_conv: RGB repeated over the N channels, scaled by 3/N;
    summed for one channel). Every other tensor is left as it is."""
    from timm.models import adapt_input_conv

    target = model.state_dict()
    adapted = dict(state)
    for key, tensor in state.items():
        wanted = target.get(key)
        if (wanted is not None and tensor.ndim == 4 and wanted.ndim == 4 and tensor.shape[1] == 3
                and wanted.shape[1] != 3 and tensor.shape[0] == wanted.shape[0] and tensor.shape[2:] == wanted.shape[2:]):
            adapted[key] = adapt_input_conv(wanted.shape[1], tensor)
    return adapted


def check_kinds(model: torch.nn.Module, state: dict[str, torch.Tensor], label: str, arch: str) -> None:
    """Weights of the wrong kind are refused, not cast: a complex tensor anywhere, or an integer
    or boolean one where the model has a floating-point one (a uint8 image dump, a quantized
    file). Integer buffers where the model has integer ones (BatchNorm's num_batches_tracked,
    position indices) are the model's own and load as before."""
    target = model.state_dict()
    wrong = sorted(key for key, tensor in state.items() if tensor.is_complex() or (
        key in target and target[key].is_floating_point() and not tensor.is_floating_point()))
    if wrong:
        kinds = sorted({str(state[key].dtype).removeprefix("torch.") for key in wrong})
        raise MlexpError(f"weights {label}: {len(wrong)} tensor(s) are {', '.join(kinds)} where {arch} has "
                         f"floating-point ones ({name_groups(wrong)}); pretrained weights are float16, bfloat16 "
                         "or float32 tensors: they would be cast, not loaded")


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor], head: tuple[str, ...],
                  label: str, arch: str) -> list[str]:
    """--weights-strict false: every tensor whose name and shape match; at least one must."""
    target = model.state_dict()
    matched = [k for k in target if k in state and state[k].shape == target[k].shape]
    if not matched:
        sample = ", ".join(list(state)[:3])
        raise MlexpError(f"weights {label} match none of {arch}'s {len(target)} tensors by name and shape (the "
                         f"file has {len(state)}, e.g. {sample}); --weights-key-map renames a prefix")
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    return matched


def load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], head: tuple[str, ...],
                 label: str, arch: str) -> list[str]:
    """Copy `state` into `model`: every non-classifier tensor must be present with its shape,
    no foreign tensors may be left over; the classifier loads only if all its shapes match."""
    target = model.state_dict()

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in head) or key.startswith("head_dist.")

    body_keys = [k for k in target if not is_head(k)]
    matched = [k for k in body_keys if k in state]
    if not matched:
        sample = ", ".join(list(state)[:3])
        raise MlexpError(f"weights {label} match none of {arch}'s {len(body_keys)} tensors (the file has "
                         f"{len(state)}, e.g. {sample}): they are for another architecture (a checkpoint saved "
                         f"under a prefix: --weights-key-map 'PREFIX.=')")
    missing = [k for k in body_keys if k not in state and not k.endswith(_IGNORABLE_SUFFIXES)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in matched
             if state[k].shape != target[k].shape]
    foreign = [k for k in state if k not in target and not is_head(k) and not k.endswith(_IGNORABLE_SUFFIXES)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:3])})")
    if foreign:
        problems.append(f"{len(foreign)} not in the model (e.g. {', '.join(foreign[:3])})")
    if problems:
        raise MlexpError(f"weights {label} do not fit {arch}: {'; '.join(problems)}. Use weights saved "
                         f"from the same architecture, or --weights-strict false to load the tensors that fit "
                         f"and report the rest")
    to_load = {k: state[k] for k in matched}
    head_keys = [k for k in target if is_head(k)]
    if head_keys and all(k in state and state[k].shape == target[k].shape for k in head_keys):
        to_load.update({k: state[k] for k in head_keys})  # same class count: keep the classifier too
    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; a bug if it does
        raise RuntimeError(f"unexpected keys after checking: {result.unexpected_keys[:5]}")
    return list(to_load)
