"""What some options' values mean: the training geometry `--train-crop auto` resolves to, the
values `--color-jitter` takes, and which way a `--best-metric` is better. The config parses,
validates and hashes them with these; the data pipeline, training and compare read them."""

from __future__ import annotations

from mlexp.errors import MlexpError

# The built-in in-memory sets (8x8 digits, noise): whole images resized, never cropped.
BUILT_IN = ("digits", "synthetic")


# --color-jitter's default for each geometry: timm's for photos; none for the tiny built-in images
# (whole-image resizes never applied a jitter before, and a run's default keeps its meaning).
DEFAULT_JITTER = {"random-resized": 0.4, "resize": 0.0}
# What --best-metric takes for classification and detection (a user's own task: any val/NAME it logs).
BEST_METRICS = ("val/acc", "val/loss", "val/macro_f1", "train/loss", "train/acc", "val/map", "val/map_50", "val/map_75")
EITHER_TASK = ("val/acc", "train/loss")  # a detector takes these too: val/acc, the default, means its val/map


def geometry(train_crop: str, data: str) -> str:
    """The training geometry: --train-crop with `auto` resolved (random-resized crops on image
    folders, whole-image resizes on the built-in sets)."""
    if train_crop != "auto":
        return train_crop
    return "resize" if data in BUILT_IN else "random-resized"


def jitter_factors(value: float | str) -> tuple[float, float, float, float]:
    """--color-jitter as torchvision's ColorJitter takes it: (brightness, contrast, saturation,
    hue). One number is timm's meaning: the first three, no hue."""
    try:
        parts = [float(part) for part in str(value).split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3 + [0.0]
    if len(parts) == 3:
        parts.append(0.0)
    if isinstance(value, bool) or len(parts) != 4 or not all(0.0 <= part < float("inf") for part in parts) \
            or parts[3] > 0.5:
        raise MlexpError(f"--color-jitter must be one strength (0.4) or brightness,contrast,saturation[,hue] "
                         f"(0.4,0.4,0.4,0.1), each at least 0 and hue at most 0.5, got {value!r}")
    return parts[0], parts[1], parts[2], parts[3]


def canonical_jitter(value: float | str) -> float | str:
    """One spelling of a jitter: a number where brightness, contrast and saturation are equal and
    there is no hue (as runs recorded it before hue), else 'B,C,S,H'."""
    factors = jitter_factors(value)
    if factors[0] == factors[1] == factors[2] and factors[3] == 0.0:
        return factors[0]
    return ",".join(str(factor) for factor in factors)


def jitter_as_trained(jitter: float | str | None, train_crop: str, data: str) -> float | str | None:
    """The jitter of a run recorded before whole-image resizes applied one: a resize ignored the
    jitter it recorded, and trained as the default (None) does now."""
    return None if jitter and geometry(train_crop, data) == "resize" else jitter


def hashed_jitter(jitter: float | str | None, train_crop: str, data: str) -> float | str:
    """--color-jitter as config_hash hashes it. The default is hashed as every run recorded it
    before it followed the crop (0.4: random-resized crops applied it, resizes ignored it, as the
    default does now), so those runs keep their hash; a jitter a resize applies, apart from it."""
    if jitter is None:
        return DEFAULT_JITTER["random-resized"]
    return f"{jitter} with resize" if jitter and geometry(train_crop, data) == "resize" else jitter


LOWER_IS_BETTER = ("loss", "error", "ece", "time")


def best_is_max(metric: str, mode: str) -> bool:
    """Whether a higher value of `metric` is better: --best-mode, or by its name (losses,
    errors, calibration error and times are best low)."""
    if mode != "auto":
        return mode == "max"
    return not any(word in metric for word in LOWER_IS_BETTER)


def best_key(metric: str) -> str:
    """The best/* metric that holds a run's best value of `metric`: val/loss -> best/val_loss."""
    return "best/" + metric.replace("/", "_")
