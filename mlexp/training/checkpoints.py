"""Checkpoints: weights as safetensors, training state through weights-only torch.load.

Nothing here unpickles arbitrary objects: weights are safetensors files, and the
training state (optimizer, scheduler, grad scaler, RNG, counters, history) holds only
tensors and plain Python values, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mlexp.errors import MlexpError

WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors (tensors copied to CPU, contiguous, unshared);
    `metadata`: text kept in the file's header (exported weights name the run that made them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()},
              str(path), metadata=metadata)
    return path


def weights_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file ({} for other formats or none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file (a .pth): it has no metadata
        return {}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain values (weights-only loadable)."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(directory: Path, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                        ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Everything needed to resume: weights (safetensors) plus the rest (`training_state.pt`)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model_state, directory / WEIGHTS_FILE)
    if ema_state is not None:
        save_weights(ema_state, directory / EMA_WEIGHTS_FILE)
    try:
        torch.save(state, directory / STATE_FILE)
    except RuntimeError:
        # torch reports a short write ("unexpected pos 704 vs 598") without the OS's reason (a full
        # disk, a quota): write it again through Python's file, which raises the OSError that says
        # it (and the callers turn into one line), or completes the file if the cause has passed.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (directory / STATE_FILE).write_bytes(buffer.getbuffer())
    return directory


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                   dict[str, torch.Tensor] | None]:
    """The inverse of save_training_state; refuses anything but tensors and plain values."""
    if not (directory / STATE_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise MlexpError(f"no resumable checkpoint in {directory} (expected {WEIGHTS_FILE} and {STATE_FILE})")
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    ema_path = directory / EMA_WEIGHTS_FILE
    return load_weights(directory / WEIGHTS_FILE), state, load_weights(ema_path) if ema_path.is_file() else None
