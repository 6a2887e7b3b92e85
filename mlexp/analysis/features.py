"""How the learned features differ: linear CKA between a pretrained and a scratch model.

Linear centered kernel alignment (Kornblith et al. 2019) compares two representations of
the same n images, X (n x p) and Y (n x q), whatever their widths, through their Gram
matrices K = X X^T and L = Y Y^T: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). It is 1
for identical representations and unchanged by an orthogonal rotation or an isotropic
scaling of either.

mlexp uses the debiased estimator of HSIC (Song et al. 2012, as in Nguyen et al. 2021). The
plain one, <HKH, HLH>, gives independent random features a CKA near sqrt(p q / ((n + p)(n + q))):
0.67 for 512-wide layers seen on 256 images, which would read as "similar". The debiased one
is near 0 for independent features at any width (|CKA| < 0.05 for n = 400 and p = q = 2,000
in `tests/analysis/test_features.py`).

For each backbone with paired pretrained and scratch runs, `compare --features` loads the
best checkpoints of its first pair (lowest seed and fold), takes up to `MAX_IMAGES`
validation images of the run's own data and transforms, and compares the models layer by
layer: every stage timm reports (`forward_intermediates`: ResNet stages, ViT blocks, VGG
and Swin stages; feature maps average-pooled to at most 8 x 8 positions, which bounds memory
at full resolution) and the penultimate (pre-logits) features, which any timm model has.
Each model is also compared with its own initial weights where they are known: the
pretrained weights file the run logged, and for a scratch run the initialisation its seed
reproduces (mlexp builds the model right after `set_seed(seed)`, as training does).
"""

# Imported where used: `accelerate` (about 1.4 s), which only rebuilding a scratch model's
# initial weights from its seed needs.
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mlexp.analysis.comparisons import MATCH, pair_up
from mlexp.analysis.plots import new_figure
from mlexp.config import TrainConfig
from mlexp.data.sources import build_data
from mlexp.errors import MlexpError
from mlexp.models.build import build_backbone, create_model
from mlexp.models.catalogue import resolve_backbone
from mlexp.models.heads import classifier_names
from mlexp.models.strategies import attach_head
from mlexp.training.checkpoints import WEIGHTS_FILE, load_weights

MAX_IMAGES = 512
MAX_POSITIONS = 8  # feature maps are average-pooled to at most 8 x 8 before flattening
PENULTIMATE = "pre_logits"


# --- the measure -------------------------------------------------------------------------------
def gram(features) -> np.ndarray:
    """X X^T of the flattened features (float64)."""
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    x = x.reshape(len(x), -1).double()
    return (x @ x.T).numpy()


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012)'s unbiased HSIC estimator, up to a constant factor (it cancels in CKA)."""
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones_k, ones_l = k.sum(axis=0), l.sum(axis=0)
    return float(np.sum(k * l) + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
                 - 2.0 * ones_k @ ones_l / (n - 2))


def cka_from_grams(k: np.ndarray, l: np.ndarray) -> float:
    """Debiased linear CKA from two Gram matrices of the same n >= 4 examples (NaN if one is constant)."""
    denominator = unbiased_hsic(k, k) * unbiased_hsic(l, l)
    return float(unbiased_hsic(k, l) / math.sqrt(denominator)) if denominator > 0 else math.nan


def linear_cka(x, y) -> float:
    """Debiased linear CKA of two representations (rows: the same examples)."""
    return cka_from_grams(gram(x), gram(y))


def cka_matrix(first: list[np.ndarray], second: list[np.ndarray]) -> np.ndarray:
    """CKA of every Gram matrix of `first` with every one of `second`."""
    return np.array([[cka_from_grams(k, l) for l in second] for k in first])


# --- the models ----------------------------------------------------------------------------------
def pooled(stage: torch.Tensor) -> torch.Tensor:
    if stage.dim() == 4 and max(stage.shape[-2:]) > MAX_POSITIONS:
        stage = torch.nn.functional.adaptive_avg_pool2d(stage, MAX_POSITIONS)
    return stage


@torch.no_grad()
def representations(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[str], list[np.ndarray]]:
    """Layer names and the Gram matrix of each layer's output on `images`: the stages timm
    reports, then the pre-logits features (a network of the user's own: `hooked_representations`)."""
    model.eval()
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return hooked_representations(model, images)
    names, grams = [], []
    if hasattr(model, "forward_intermediates"):
        try:
            stages = model.forward_intermediates(images, intermediates_only=True)
            names = [info["module"] for info in getattr(model, "feature_info", [])][:len(stages)]
            names += [f"stage{i}" for i in range(len(names), len(stages))]
            grams = [gram(pooled(stage.float())) for stage in stages]
        except (NotImplementedError, TypeError, RuntimeError, AttributeError):
            names, grams = [], []  # a model without stage outputs: the penultimate layer alone
    grams.append(gram(model.forward_head(model.forward_features(images), pre_logits=True).float()))
    return [*names, PENULTIMATE], grams


@torch.no_grad()
def hooked_representations(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[str], list[np.ndarray]]:
    """A network without timm's stage API: each top-level child's output, in the order they ran,
    then what goes into the classifier (its pre-logits features)."""
    head = model.get_submodule(classifier_names(model)[0])
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, inputs, output: outputs.setdefault(name, output)

    hooks = [child.register_forward_hook(keep(name)) for name, child in model.named_children() if child is not head]
    hooks.append(head.register_forward_pre_hook(lambda module, inputs: outputs.setdefault(PENULTIMATE, inputs[0])))
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    names = [name for name, output in outputs.items() if name != PENULTIMATE and isinstance(output, torch.Tensor)]
    grams = [gram(pooled(outputs[name].float())) for name in names] + [gram(outputs[PENULTIMATE].float())]
    return [*names, PENULTIMATE], grams


@dataclass
class TrainedModel:
    """A run's best checkpoint rebuilt, its validation images, and its initial weights if known."""

    run_id: str
    init: str
    seed: str
    model: torch.nn.Module
    images: torch.Tensor
    initial: torch.nn.Module | None
    initial_source: str


def rebuild(client, run_id: str, workdir: Path) -> TrainedModel:
    """The model of a finished run, from its config.json and best (else final) checkpoint."""
    from accelerate.utils import set_seed

    folder = workdir / run_id
    folder.mkdir(parents=True, exist_ok=True)
    try:
        config = Path(client.download_artifacts(run_id, "config.json", str(folder)))
    except Exception as error:  # noqa: BLE001 - any store error means: no config to rebuild from
        raise MlexpError(f"run {run_id} has no config.json ({type(error).__name__})") from None
    cfg = TrainConfig.from_dict(json.loads(config.read_text()))
    weights = None
    for name in ("checkpoints/best", "checkpoints/final"):
        try:
            weights = Path(client.download_artifacts(run_id, f"{name}/{WEIGHTS_FILE}", str(folder)))
            break
        except Exception:  # noqa: BLE001 - not there: try the next
            continue
    if weights is None:
        raise MlexpError(f"run {run_id} has no checkpoints/best or checkpoints/final weights")
    if cfg.task != "classification":
        raise MlexpError(f"--features compares classifiers' representations; run {run_id} is a {cfg.task} run "
                         "(compare it without --features)")
    spec = resolve_backbone(cfg.backbone, cfg.init, cfg.plugins).with_in_chans(cfg.in_chans)
    set_seed(cfg.seed)  # as training does: the scratch initialisation follows from the seed
    data = build_data(cfg)
    initial, source = None, "unknown"
    if spec.init == "scratch":
        initial, source = create_model(spec, data.num_classes, cfg.img_size), f"seed {cfg.seed}"
    else:
        logged = client.get_run(run_id).data.params.get("weights_path")
        if logged and Path(logged).is_file():
            initial = build_backbone(spec, data.num_classes, cfg.img_size, logged, cfg.weights_strict,
                                     cfg.weights_key_map).model
            source = logged
    model = create_model(spec, data.num_classes, cfg.img_size)
    attach_head(model, cfg.head, data.num_classes)
    model.load_state_dict(load_weights(weights))
    count = min(MAX_IMAGES, len(data.val_set))
    images = torch.stack([data.val_set[i][0] for i in range(count)])
    return TrainedModel(run_id, spec.init, str(cfg.seed), model, images, initial, source)


# --- one backbone ------------------------------------------------------------------------------------
@dataclass
class FeatureComparison:
    backbone: str
    pretrained_run: str = ""
    scratch_run: str = ""
    seed: str = ""
    images: int = 0
    layers: list[str] = field(default_factory=list)
    cka: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))   # pretrained layer x scratch layer
    to_init: dict[str, list[float]] = field(default_factory=dict)        # init -> per-layer CKA to its initial model
    files: list[Path] = field(default_factory=list)
    problem: str = ""                                                     # why it could not be computed

    def diagonal(self) -> np.ndarray:
        return np.diag(self.cka) if self.cka.size else np.array([])

    def sentence(self) -> str:
        if self.problem:
            return f"{self.backbone}: not computed ({self.problem})."
        same = self.diagonal()
        if not np.isfinite(same).all():
            return f"{self.backbone}: not computed (a layer's output was constant over the validation images)."
        low = int(np.nanargmin(same))
        text = (f"{self.backbone} (seed {self.seed} pair, {self.images} validation images): linear CKA between "
                f"pretrained and scratch is {same[0]:.2f} at the first layer ({self.layers[0]}), {same[-1]:.2f} at "
                f"the penultimate features, lowest at {self.layers[low]} ({same[low]:.2f})")
        if same[-1] < 0.5:
            text += ": the two initialisations end up with clearly different representations"
        elif same[-1] < 0.8:
            text += ": their representations overlap only partly"
        else:
            text += ": they learned similar representations"
        moved = [f"{values[-1]:.2f} ({init})" for init, values in self.to_init.items()]
        if moved:
            text += ("; against the models' own initial weights, the penultimate features have CKA "
                     + " and ".join(moved) + " (lower: training moved further from the start)")
        return text + "."

    def summary(self) -> dict:
        return {"backbone": self.backbone, "pretrained_run": self.pretrained_run, "scratch_run": self.scratch_run,
                "seed": self.seed, "images": self.images, "layers": self.layers,
                "same_layer_cka": [round(float(v), 6) for v in self.diagonal()],
                "to_init": {k: [round(float(v), 6) for v in values] for k, values in self.to_init.items()},
                "problem": self.problem}


def compare_backbone(client, arch: str, pretrained_run: str, scratch_run: str, out_dir: Path,
                     workdir: Path) -> FeatureComparison:

    result = FeatureComparison(arch, pretrained_run, scratch_run)
    try:
        pretrained, scratch = rebuild(client, pretrained_run, workdir), rebuild(client, scratch_run, workdir)
    except (MlexpError, RuntimeError, OSError) as error:
        result.problem = str(error).splitlines()[0]
        return result
    if pretrained.images.shape != scratch.images.shape or not torch.equal(pretrained.images, scratch.images):
        result.problem = "the two runs were validated on different images (data, split or image size differ)"
        return result
    layers, features_a = representations(pretrained.model, pretrained.images)
    _, features_b = representations(scratch.model, scratch.images)
    result.seed, result.images, result.layers = pretrained.seed, len(pretrained.images), layers
    result.cka = cka_matrix(features_a, features_b)
    for trained, features in ((pretrained, features_a), (scratch, features_b)):
        if trained.initial is not None:
            _, initial = representations(trained.initial, trained.images)
            result.to_init[trained.init] = [cka_from_grams(a, b) for a, b in zip(features, initial)]
    result.files = write_files(result, out_dir)
    return result


def write_files(result: FeatureComparison, out_dir: Path) -> list[Path]:
    folder = out_dir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(result.cka, index=[f"pretrained:{n}" for n in result.layers],
                         columns=[f"scratch:{n}" for n in result.layers])
    matrix = folder / f"{result.backbone}_cka.csv"
    table.to_csv(matrix, index_label="layer")
    per_layer = pd.DataFrame({"layer": result.layers, "pretrained_vs_scratch": result.diagonal(),
                              **{f"{init}_vs_its_init": values for init, values in result.to_init.items()}})
    layers = folder / f"{result.backbone}_cka_by_layer.csv"
    per_layer.to_csv(layers, index=False)
    heatmap = folder / f"{result.backbone}_cka.png"
    heatmap_figure(result).savefig(heatmap)
    return [matrix, layers, heatmap]


def heatmap_figure(result: FeatureComparison):
    size = len(result.layers)
    fig = new_figure(13, 6, left=0.12, bottom=0.25, right=0.97, wspace=0.45)
    ax, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    image = ax.imshow(result.cka, vmin=0, vmax=1, cmap="magma", origin="lower")
    ax.set_xticks(range(size), result.layers, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(size), result.layers, fontsize=7)
    ax.set_xlabel("scratch model layer")
    ax.set_ylabel("pretrained model layer")
    ax.set_title(f"{result.backbone}: linear CKA, pretrained vs scratch", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    positions = range(size)
    lines.plot(positions, result.diagonal(), marker="o", label="pretrained vs scratch (same layer)")
    for init, values in result.to_init.items():
        lines.plot(positions, values, marker="s", linestyle="--", label=f"{init} vs its initial weights")
    lines.set_xticks(list(positions), result.layers, rotation=60, ha="right", fontsize=7)
    lines.set_ylim(0, 1.05)
    lines.set_ylabel("linear CKA")
    lines.set_title(f"{result.images} validation images, seed {result.seed} pair", fontsize=10)
    lines.grid(True, alpha=0.3)
    lines.legend(fontsize=8, loc="lower left")
    return fig


# --- every backbone -----------------------------------------------------------------------------------
def compare_features(client, runs: pd.DataFrame, out_dir: Path) -> list[FeatureComparison]:
    """One FeatureComparison per backbone with a pretrained/scratch pair (its first pair)."""

    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlexp-features-") as workdir:
        for arch, mine in runs.groupby("_arch", sort=True):
            pairs = pair_up(mine, "_init", "pretrained", "scratch", ["_strategy", *MATCH])
            if pairs.empty:
                continue
            order = pairs.assign(_seed=pd.to_numeric(pairs["seed"], errors="coerce"),
                                 _fold=pd.to_numeric(pairs["fold"], errors="coerce"))
            first = order.sort_values(["_seed", "_fold", "seed", "fold"]).iloc[0]  # the lowest seed, numerically
            results.append(compare_backbone(client, arch, first["run_id_a"], first["run_id_b"], out_dir,
                                            Path(workdir)))
    return results
