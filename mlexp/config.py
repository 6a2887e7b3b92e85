"""TrainConfig: every training option, declared once.

The CLI options (`mlexp train --help`), the MLproject parameters and the MLflow params
are all generated from the fields below, so they cannot drift apart. Each field carries
its help text (and, where it has one, its set of choices) in its metadata.

`TrainConfig.from_strings` is the single parser: it turns the text a user typed (on the
command line or as `mlflow run -P name=value`) into typed, validated values. MLflow does
not validate MLproject parameter types, so this is where that happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from mlexp.credentials import redact
from mlexp.errors import MlexpError
from mlexp.option_values import BEST_METRICS, EITHER_TASK, canonical_jitter, hashed_jitter, jitter_as_trained

# Larger inputs are almost always a typo (2240 for 224) and would exhaust memory long after
# the run started; ImageNet-style backbones are trained at 224-512 px.
MAX_IMG_SIZE = 1024
# Where runs go, and what the reading commands read, when no --experiment is given.
DEFAULT_EXPERIMENT = "mlexp"


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, repeatable: bool = False) -> Any:
    """A config field with its help text (and allowed values) attached. A repeatable option may be
    given several times on the command line; its values are joined with commas (as one
    `mlflow run -P name=a,b` spells them)."""
    return field(default=default, metadata={"help": help, "choices": choices, "repeatable": repeatable})


@dataclass(frozen=True)
class TrainConfig:
    """One training run, fully described. Frozen: derive a new one with `replace`."""

    # --- what to train, on what -------------------------------------------------------
    backbone: str = option("resnet18", "Catalogue name (see `mlexp backbones`), any timm model name, or a model "
                           "of your own as MODULE:FACTORY (e.g. mymodels:twistnet18; README, \"Your own model\").")
    plugins: str | None = option(None, "Modules to import first, comma-separated (also $MLEXP_PLUGINS): the timm "
                                 "@register_model functions in them become backbone names.")
    init: str = option("auto", "Weight initialisation; 'auto' takes it from the catalogue name.",
                       ("auto", "pretrained", "scratch"))
    weights: str | None = option(None, "Pretrained weights: a .safetensors/.pth file, runs:/RUN_ID/path or "
                                 "models:/NAME/VERSION. Default: MLEXP_WEIGHTS_DIR or ./weights/, then timm.")
    weights_from: str | None = option(None, "Look for pretrained weights in the weights folder under this "
                                      "backbone's name (an ablation variant starting from its full network's "
                                      "file; with --weights-strict false).")
    weights_strict: bool = option(True, "Pretrained weights must fit the network (only a classifier for another "
                                  "class count may be left out). false: load every tensor whose name and shape "
                                  "match, keep the rest freshly initialised, and report what loaded.")
    weights_key_map: str | None = option(None, "Rename a prefix of the weights file's tensor names before loading, "
                                         "OLD=NEW (e.g. 'encoder.=' for a checkpoint saved inside an encoder); "
                                         "repeatable.", repeatable=True)
    task: str = option("classification", "What the model learns: classification (a label per image), detection "
                       "(boxes: Faster R-CNN, COCO JSON or YOLO folders), or your own task: MODULE:CLASS or a "
                       "name a package declares (README: \"Detection\", \"Your own task\").")
    data: str = option("digits", "An ImageFolder path; a folder with split files (labels/train1.txt, val1.txt, "
                       "test1.txt, ...: one partition per fold); torchvision:NAME:ROOT for a torchvision dataset "
                       "in a local folder (torchvision:DTD:/data/dtd, torchvision:CIFAR10:/data); 'digits' "
                       "(built-in, offline) or 'synthetic'.")
    download: bool = option(False, "Let a torchvision:NAME:ROOT dataset download its files into ROOT when they are "
                            "missing (never done unless asked).")
    splits: str | None = option(None, "A split manifest (CSV or JSON): each image's path (relative to --data), "
                                "class, and its split (train, val, test or empty) in each fold; --fold chooses "
                                "the fold.")
    val_dir: str | None = option(None, "A separate ImageFolder for validation (default: DATA/val if it "
                                 "exists, else a split of the training data).")
    val_split: float = option(0.2, "Fraction of the data (after any --test-split) held out for validation when "
                              "there is no val dir.")
    test_split: float = option(0.0, "Fraction of the data held out as a test set, the same for every seed and "
                               "fold, evaluated once at the end with the best-on-validation weights (test/acc). "
                               "0 = none; a DATA/test folder (or --test-dir) is used when it exists.")
    test_dir: str | None = option(None, "A separate ImageFolder for the test set (default: DATA/test beside "
                                  "DATA/train if it exists, else --test-split of the data).")
    folds: int = option(0, "Use k-fold splits of the data instead of val-split (0 = off); the images must be one "
                        "pool (no separate validation folder, no split of their own).")
    fold: int = option(0, "Which fold: with --folds K the validation fold (0-based); on data with a split of its "
                       "own (split files, --splits, torchvision:DTD) its fold number (DTD's 1-10).")
    img_size: int = option(32, f"Square input size in pixels (at most {MAX_IMG_SIZE}).")
    in_chans: int = option(3, "Channels per image; other than 3: NumPy stacks (NAME.npy, height x width x "
                           "channels), a pretrained stem adapted as timm adapts it (README: more than three channels).")
    bands: str | None = option(None, "Detection: folders beside images/ (depth,thermal) holding each image's extra "
                               "bands in a file of its name, stacked after its channels (--in-chans counts all).")
    train_crop: str = option("auto", "Training geometry: timm's random-resized crop (validation: resize and "
                             "center-crop by the model's crop_pct), or the whole image resized (tiny images "
                             "such as digits). 'auto': random-resized on image folders, resize on the built-in "
                             "sets. Mean, std and interpolation always follow the backbone's timm data config.",
                             ("auto", "random-resized", "resize"))

    # --- optimisation -----------------------------------------------------------------
    epochs: int = option(3, "Number of training epochs (before scratch adjustments).")
    batch_size: int = option(32, "Batch size per process.")
    lr: float = option(1e-3, "Peak learning rate (before scratch adjustments).")
    weight_decay: float = option(0.05, "Weight decay (before scratch adjustments).")
    optimizer: str = option("adamw", "Optimizer.", ("adamw", "sgd"))
    momentum: float = option(0.9, "SGD momentum.")
    scheduler: str = option("cosine", "Learning-rate schedule, stepped every optimizer step.",
                            ("cosine", "step", "none"))
    warmup_epochs: float = option(0.0, "Linear warmup length in epochs (before scratch adjustments).")
    step_size: int = option(10, "Step schedule: epochs between decays.")
    gamma: float = option(0.1, "Step schedule: decay factor.")
    grad_accum: int = option(1, "Gradient accumulation steps per optimizer step.")
    clip_grad: float = option(0.0, "Clip gradient norm to this value (0 = off).")
    mixed_precision: str = option("auto", "Mixed precision. 'auto': bf16 on a GPU that supports it, fp16 with a "
                                  "gradient scaler on one that does not, none on CPU (fp16 needs a GPU).",
                                  ("auto", "no", "bf16", "fp16"))

    # --- initialisation strategy (pretrained vs scratch) -------------------------------
    scratch_lr_mult: float = option(1.5, "Scratch init: learning-rate multiplier.")
    scratch_epochs_mult: float = option(1.2, "Scratch init: epochs multiplier (rounded).")
    scratch_warmup_mult: float = option(1.5, "Scratch init: warmup multiplier.")
    scratch_wd_mult: float = option(0.8, "Scratch init: weight-decay multiplier.")

    # --- fine-tuning strategy -----------------------------------------------------------
    strategy: str = option("full", "Fine-tuning strategy.", ("full", "linear", "gradual"))
    head: str = option("linear", "Classification head: 'mlp' is Linear-512, ReLU, Dropout 0.3, Linear.",
                       ("linear", "mlp"))
    linear_probe_epochs: int = option(10, "Linear probe: at most this many epochs.")
    gradual_patience: int = option(3, "Gradual unfreezing: epochs without val-loss improvement "
                                   "before the next phase (0 = next phase every epoch, as in ULMFiT).")
    unfreeze_patterns: str | None = option(None, "Where a network's stages are, for gradual unfreezing (one "
                                           "phase each, from the head down) and layer-wise LR decay (one group "
                                           "each): regexes over parameter names separated by ';', e.g. "
                                           "'head|fc;layer4;.*'. Default: the family's own, the model's "
                                           "group_matcher, else its top-level children.")
    llrd_decay: float = option(0.9, "Full fine-tuning: layer-wise LR decay (1.0 = none).")

    # --- recipe -----------------------------------------------------------------------
    recipe: str | None = option(None, "A preset of defaults (see `mlexp recipes`); explicit options win.")
    label_smoothing: float = option(0.0, "Label smoothing.")
    mixup: float = option(0.0, "Mixup alpha (0 = off).")
    cutmix: float = option(0.0, "CutMix alpha (0 = off).")
    aa: str | None = option(None, "RandAugment policy, e.g. rand-m9-mstd0.5 (timm syntax).")
    hflip: float | None = option(None, "Random horizontal flip probability (default: 0.5 with random-resized "
                                 "crops, 0 with --train-crop resize).")
    color_jitter: str | float | None = option(None, "Colour jitter on training images: one strength for "
                                              "brightness, contrast and saturation (0.4), or B,C,S,H with a hue "
                                              "shift H in [0, 0.5] (0.4,0.4,0.4,0.1); 0 = off. Default: 0.4 with "
                                              "random-resized crops, 0 with --train-crop resize. RandAugment "
                                              "(--aa) replaces it, with either crop.")
    rotate: float = option(0.0, "Rotate training images by a random angle of up to this many degrees either "
                           "way (0-180; 0 = off), in the backbone's interpolation; bare corners take its mean colour.")
    reprob: float = option(0.0, "Random erasing probability.")
    ema: bool = option(False, "Keep an EMA of the weights; evaluate and checkpoint it.")
    ema_decay: float = option(0.999, "EMA decay per optimizer step.")
    early_stop_patience: int = option(0, "Stop when the best metric (--best-metric) has not improved for this "
                                      "many epochs (0 = off).")
    best_metric: str = option("val/acc", f"The epoch metric that picks the best checkpoint, early stopping, best/*: "
                              f"{', '.join(BEST_METRICS)}; your own task's val/NAME (its primary one by default).")
    best_mode: str = option("auto", "Whether the best metric is best high or low. 'auto': min for losses and "
                            "errors, else max.", ("auto", "max", "min"))
    best_checkpoint: str = option("weights", "What checkpoints/best/ keeps: the weights, or 'full': also the "
                                  "optimizer, scheduler and history, so `--resume RUN --resume-from best` "
                                  "continues from it.", ("weights", "full"))
    calibrate: bool = option(True, "Fit temperature scaling on the validation split after training.")
    channels_last: str = option("auto", "channels_last memory format. 'auto': on a GPU, for convolutional "
                                "backbones (where cuDNN is faster with it); on a CPU, for ResNets (about "
                                "15% faster there; VGG is slower).", ("auto", "true", "false"))
    compile: bool = option(False, "Compile the model with torch.compile.")

    # --- run bookkeeping -----------------------------------------------------------------
    seed: int = option(42, "Random seed.")
    workers: int = option(-1, "DataLoader worker processes per training process. -1 or 'auto': for image "
                          "folders, this process's share of the CPUs (up to 8); 0 for the built-in in-memory "
                          "sets, which need no decoding.")
    checkpoint_every: int = option(0, "Also keep a weights snapshot every N epochs under "
                                   "checkpoints/epoch_NNN/ (0 = off; last/best/final are always kept).")
    experiment: str = option(DEFAULT_EXPERIMENT, "MLflow experiment name (ignored under `mlflow run`, "
                             "which chooses the experiment).")
    run_name: str | None = option(None, "MLflow run name (default: BACKBONE-INIT-STRATEGY).")
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                      "sqlite:///mlflow.db in the current folder).")
    resume: str | None = option(None, "Resume this run (MLflow run id, or an offline run's id) from its newest "
                                "complete checkpoint.")
    resume_from: str = option("last", "With --resume: continue from the newest checkpoint ('last'), or from the "
                              "best one ('best'; the run must have kept it with --best-checkpoint full).",
                              ("last", "best"))
    log_dir: str = option("mlexp-output/runs", "Where each run's live logs go (RUN_ID/epoch_metrics.csv, "
                          "batch_metrics.csv, log.jsonl), appended while it trains.")
    offline: bool = option(False, "Record the run on this machine only, with no tracking server "
                           "($MLEXP_OFFLINE=1 does the same); send it later with `mlexp sync --to URI`.")
    export_weights: bool = option(False, "Also write the final weights to the weights folder, where "
                                  "later pretrained runs of this backbone find them.")
    log_models: bool = option(True, "Log the best and final weights as MLflow logged models (pyfunc: images in, "
                              "class probabilities out) for `mlexp evaluate`, `mlexp register` and serving.")
    system_metrics: bool = option(True, "Record CPU, memory, disk and network use (and GPU use where NVIDIA's "
                                  "management library is installed: mlexp[gpu]) as system/* metrics every "
                                  "$MLEXP_SYSTEM_METRICS_S seconds (default 10).")
    dry_run: bool = option(False, "Print the effective configuration and the plan; train nothing.")

    def __post_init__(self) -> None:
        if self.color_jitter is not None:  # typed as text first (the CLI's); one spelling per jitter
            object.__setattr__(self, "color_jitter", canonical_jitter(self.color_jitter))
        self.validate()

    # --- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise MlexpError naming the first bad value and what is allowed."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise MlexpError(f"--{cli_name(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        positive = ("epochs", "batch_size", "lr", "img_size", "in_chans", "grad_accum", "step_size",
                    "linear_probe_epochs", "ema_decay")
        for name in positive:
            if not getattr(self, name) > 0:
                raise MlexpError(f"--{cli_name(name)} must be positive, got {getattr(self, name)}")
        non_negative = ("weight_decay", "warmup_epochs", "clip_grad", "label_smoothing", "mixup", "cutmix", "reprob",
                        "checkpoint_every", "early_stop_patience", "folds", "gradual_patience", "momentum", "gamma")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise MlexpError(f"--{cli_name(name)} must not be negative, got {getattr(self, name)}")
        if self.img_size > MAX_IMG_SIZE:
            raise MlexpError(f"--img-size must be at most {MAX_IMG_SIZE}, got {self.img_size}")
        if not 0.0 < self.val_split < 1.0:
            raise MlexpError(f"--val-split must be between 0 and 1 (exclusive), got {self.val_split}")
        if not 0.0 <= self.test_split < 1.0 or (not self.folds and self.val_split + self.test_split >= 1.0):
            raise MlexpError(f"--test-split must be in [0, 1) and leave data to train on with --val-split "
                             f"{self.val_split}, got {self.test_split}")
        builtin, metric = self.task in ("classification", "detection"), self.best_metric
        if (builtin and metric not in BEST_METRICS) or not metric.startswith(("val/", "train/")):
            raise MlexpError(f"--best-metric must be one of {', '.join(BEST_METRICS)}, got {metric!r}")
        if builtin and metric.startswith("val/map") != (self.task == "detection") and metric not in EITHER_TASK:
            raise MlexpError(f"--best-metric {metric} is not a metric of --task {self.task}")
        if self.task != "classification" and (self.mixup > 0 or self.cutmix > 0):
            raise MlexpError(f"--task {self.task} trains without --mixup/--cutmix (they mix class labels)")
        if self.bands and self.task != "detection":
            raise MlexpError("--bands reads band folders beside a detection folder's images/ (--task detection)")
        if self.folds == 1:
            raise MlexpError("--folds must be 0 (off) or at least 2")
        if self.folds and not 0 <= self.fold < self.folds:
            raise MlexpError(f"--fold must be in 0..{self.folds - 1} for --folds {self.folds}, got {self.fold}")
        if not 0.0 < self.llrd_decay <= 1.0:
            raise MlexpError(f"--llrd-decay must be in (0, 1], got {self.llrd_decay}")
        if self.workers < AUTO:
            raise MlexpError(f"--workers must be 'auto' (-1) or a number of processes, got {self.workers}")
        if self.hflip is not None and not 0.0 <= self.hflip < 1.0:
            raise MlexpError(f"--hflip must be in [0, 1), got {self.hflip}")
        if not 0.0 <= self.rotate <= 180.0:  # a range either way: a sign would mean nothing
            raise MlexpError(f"--rotate must be in [0, 180] degrees, got {self.rotate}")
        for name in ("reprob", "label_smoothing"):
            if getattr(self, name) >= 1.0:
                raise MlexpError(f"--{cli_name(name)} must be below 1, got {getattr(self, name)}")
        phase_regexes(self.unfreeze_patterns)  # a user's own patterns and key maps: their errors named
        key_map_pairs(self.weights_key_map)

    # --- conversion ------------------------------------------------------------------------
    @classmethod
    def from_strings(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from user-typed values (strings or already-typed), validating types.

        Empty strings mean "not set" so that MLproject parameters can default to "".
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MlexpError(f"unknown option(s): {', '.join(unknown)}")
        types = get_type_hints(cls)
        typed = {name: parse_value(name, types[name], raw) for name, raw in values.items()
                 if raw is not None and raw != ""}
        return cls(**typed)

    def to_params(self) -> dict[str, str]:
        """Flat MLflow params: every field, as text ('' for unset); credentials masked."""
        return {name: "" if value is None else str(value) for name, value in self.to_dict().items()}

    def to_dict(self) -> dict[str, Any]:
        """Every field; a tracking URI's credentials masked (what is written is never a secret)."""
        return {**dataclasses.asdict(self), "tracking_uri": redact(self.tracking_uri)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A recorded config (config.json): a field it lacks takes the value that reproduces what the
        run trained with (ADDED_LATER); an old boolean of a now three-way field its word."""
        known = {f.name for f in fields(cls)}
        restored = {**ADDED_LATER, **{k: v for k, v in values.items() if k in known}}
        for name in TRISTATE_FIELDS:
            if isinstance(restored.get(name), bool):
                restored[name] = "true" if restored[name] else "false"
        cfg = cls(**restored)
        if "rotate" in values:  # recorded since whole-image resizes apply a jitter
            return cfg
        return cfg.replace(color_jitter=jitter_as_trained(cfg.color_jitter, cfg.train_crop, cfg.data))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Fields that say where and how a run is recorded, not what is trained: left out of its hash.
BOOKKEEPING = ("experiment", "run_name", "tracking_uri", "resume", "dry_run", "export_weights", "offline",
               "system_metrics", "log_models", "download", "resume_from", "log_dir", "best_checkpoint")


# Fields added after runs were recorded, with the value that reproduces those runs: left out of the hash
# while at it (those runs keep their hash: resumable, counted once), and given to their recorded configs.
ADDED_LATER = {"test_split": 0.0, "test_dir": None, "train_crop": "resize", "color_jitter": 0.0, "plugins": None,
               "weights_from": None, "weights_strict": True, "weights_key_map": None, "unfreeze_patterns": None,
               "best_metric": "val/acc", "best_mode": "auto", "splits": None, "rotate": 0.0,
               "task": "classification", "in_chans": 3, "bands": None}
AUTO = -1  # --workers auto
TRISTATE = ("auto", "true", "false")
TRISTATE_FIELDS = ("channels_last",)


def config_hash(cfg: TrainConfig) -> str:
    """A stable hash of what is trained: two runs with one hash are one configuration (a sweep
    trains each once; `mlexp compare` counts each once)."""
    values = {k: v for k, v in cfg.to_dict().items()
              if k not in BOOKKEEPING and not (k in ADDED_LATER and v == ADDED_LATER[k])}
    if "color_jitter" in values:
        values["color_jitter"] = hashed_jitter(cfg.color_jitter, cfg.train_crop, cfg.data)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def phase_regexes(text: str | None) -> list[str]:
    """--unfreeze-patterns 'head|fc;layer4;.*' -> the regex of each phase, from the head down."""
    parts = [part.strip() for part in (text or "").split(";") if part.strip()]
    for part in parts:
        try:
            re.compile(part)
        except re.error as error:
            raise MlexpError(f"--unfreeze-patterns: {part!r} is not a regular expression ({error})") from None
    return parts


def key_map_pairs(text: str | None) -> list[tuple[str, str]]:
    """--weights-key-map 'encoder.=,backbone.=net.' -> [("encoder.", ""), ("backbone.", "net.")]."""
    pairs = []
    for item in (text or "").split(","):
        if item.strip():
            old, sep, new = item.strip().partition("=")
            if not sep or not old:
                raise MlexpError(f"--weights-key-map {item.strip()!r}: expected OLD=NEW, e.g. 'encoder.=' to drop "
                                 f"an encoder. prefix")
            pairs.append((old, new))
    return pairs


def cli_name(field_name: str) -> str:
    """`img_size` -> `img-size`: the spelling of a field on the command line."""
    return field_name.replace("_", "-")


def base_type(annotation: Any) -> type:
    """The concrete type of a field annotation (`str | None` -> str)."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return args[0] if args else annotation


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def parse_value(name: str, annotation: Any, raw: Any) -> Any:
    """Convert one user-typed value to the field's type, or raise MlexpError."""
    kind = base_type(annotation)
    if not isinstance(raw, str):
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, kind):
            return raw
        raw = str(raw)
    text = raw.strip()
    if name in TRISTATE_FIELDS and text.lower() in _TRUE | _FALSE:
        return "true" if text.lower() in _TRUE else "false"
    if kind is int and text.lower() == "auto" and name == "workers":
        return AUTO
    if kind is int and name in ("fold", "folds") and re.fullmatch(r"\d+\s*[-,][\d\s,-]*", text):
        raise MlexpError(f"--{cli_name(name)} {text} names several folds, and a training run trains one (--fold N); "
                         f"`mlexp sweep --folds {text}` trains each")
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        wanted = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise MlexpError(f"--{cli_name(name)} must be {wanted}, got {raw!r}") from None


def config_fields() -> list[dataclasses.Field]:
    return list(fields(TrainConfig))
