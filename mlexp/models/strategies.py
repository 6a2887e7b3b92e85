"""Fine-tuning strategies: linear probe, gradual unfreezing, full fine-tuning with LLRD.

A strategy decides, for the current phase, which parameters are *trainable*: a regex over
parameter names (the same regex, applied to module names, decides which modules are frozen
and so run in eval mode). Phases per strategy:

    full      [everything]                      layer-wise LR decay in param_groups()
    linear    [classifier]                      backbone requires_grad=False, forever
    gradual   [classifier, top of the network, everything]   (architecture-aware)

How gradual freezing works, and why: DDP only synchronises parameters that required grad
when the model was wrapped, so un-freezing by flipping requires_grad later would silently
leave those parameters unsynchronised (ranks drift apart). Instead every parameter stays
trainable and sits in the optimizer from the start; after backward (and DDP's all-reduce)
`drop_frozen_grads()` sets the gradients of currently frozen parameters to None, and
torch's optimizers skip parameters without a gradient: no update, no weight decay, no
momentum or Adam state. The gradients of frozen parts are still computed (that is the
price of not re-wrapping the model). A linear probe never un-freezes, so its backbone can
safely use requires_grad=False, which also skips those gradients.

Frozen BatchNorm layers must also stay in eval mode, or their running statistics drift
even though no weight changes: `train_mode()` replaces `model.train()`.
"""

# Imported where used: `timm` (0.4 s more than torch), because the sweep and tune launchers
# import this module (through mlexp.tasks.kinds) to check configurations, and build no model.
from __future__ import annotations

import fnmatch
import re
import warnings

from torch import nn

from mlexp.config import TrainConfig, phase_regexes
from mlexp.errors import MlexpError
from mlexp.models.heads import classifier_names

MLP_HIDDEN = 512
MLP_DROPOUT = 0.3
EVERYTHING = r".*"
FAMILIES = ("resnet", "vgg", "vit", "swin", "other")


# --- the classifier ------------------------------------------------------------------------

def attach_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Give the model a `head` classifier with `num_classes` outputs, in place.

    'linear' keeps timm's classifier (re-created if it has the wrong size); 'mlp' replaces it
    with the transfer-learning head: Linear(in, 512), ReLU, Dropout(0.3), Linear(512, num_classes).
    """
    if head not in ("linear", "mlp"):
        raise MlexpError(f"--head must be one of linear, mlp, got {head!r}")
    names = classifier_names(model)
    if head == "mlp" and len(names) != 1:
        raise MlexpError(f"--head mlp needs a model with one classifier; {type(model).__name__} has "
                         f"{len(names)} ({', '.join(names)}). Use --head linear.")
    for name in names:
        old = model.get_submodule(name)
        wrong_size = not isinstance(old, nn.Linear) or old.out_features != num_classes
        if wrong_size and hasattr(model, "reset_classifier") and len(names) == 1:
            model.reset_classifier(num_classes)
            name = classifier_names(model)[0]
            old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise MlexpError(f"the classifier {name} of {type(model).__name__} is a {type(old).__name__}, "
                             "not a Linear layer; mlexp cannot size it")
        if head == "linear":
            if old.out_features != num_classes:
                model.set_submodule(name, nn.Linear(old.in_features, num_classes).to(old.weight))
            continue
        mlp = nn.Sequential(
            nn.Linear(old.in_features, MLP_HIDDEN),
            nn.ReLU(),
            nn.Dropout(MLP_DROPOUT),
            nn.Linear(MLP_HIDDEN, num_classes),
        ).to(old.weight)
        model.set_submodule(name, mlp)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


# --- names -> phases ---------------------------------------------------------------------------

def _prefix_pattern(prefixes: list[str]) -> str:
    """A regex matching these module paths and everything under them (anchored: 'norm' is not 'norm1')."""
    return "^(?:" + "|".join(re.escape(p) for p in prefixes) + r")(?:\.|$)"


def _either(*patterns: str) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


def _indices(names: list[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.match(pattern, n))})


def _top_of_network(model: nn.Module, family: str) -> str | None:
    """Regex for what gradual unfreezing's middle phase adds to the classifier, or None."""
    names = [n for n, _ in model.named_parameters()]
    children = {n for n, _ in model.named_children()}
    if family == "vit":   # final norm + last two blocks (+ whatever sits between them and the head)
        blocks = _indices(names, r"^blocks\.(\d+)\.")
        if len(blocks) < 2:
            return None
        tail = [p for p in ("norm", "fc_norm", "attn_pool", "head_drop", "head", "head_dist") if p in children]
        return _prefix_pattern(tail + [f"blocks.{i}" for i in blocks[-2:]])
    if family == "resnet":   # last residual stage (layer4)
        stages = _indices(names, r"^layer(\d+)\.")
        return _prefix_pattern([f"layer{stages[-1]}"]) if stages else None
    if family == "swin":   # final norm + last stage (layers.3)
        stages = _indices(names, r"^layers\.(\d+)\.")
        tail = [p for p in ("norm", "head") if p in children]
        return _prefix_pattern(tail + [f"layers.{stages[-1]}"]) if stages else None
    if family == "vgg":   # last conv block of `features` (after the last inner MaxPool) + pre_logits
        features = getattr(model, "features", None)
        if not isinstance(features, nn.Sequential):
            return None
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        if pools and pools[-1] == len(features) - 1:
            pools = pools[:-1]   # the trailing pool closes the last block; the block starts after the one before
        start = pools[-1] + 1 if pools else 0
        tail = [p for p in ("pre_logits", "head") if p in children]
        return _prefix_pattern(tail + [f"features.{i}" for i in range(start, len(features))])
    return None


def phase_patterns(model: nn.Module, family: str, strategy: str, unfreeze_patterns: str | None = None) -> list[str]:
    """One regex per phase over parameter/module names; a name matching it is trainable then.
    Gradual phases: --unfreeze-patterns (each phase adds its regex to the ones before), else the
    family's layout, else the model's own groups (timm's group_matcher: its last one), else head
    -> everything."""
    if family not in FAMILIES:
        raise MlexpError(f"unknown backbone family {family!r}; expected one of {', '.join(FAMILIES)}")
    head = _prefix_pattern(classifier_names(model))
    if strategy == "full":
        return [EVERYTHING]
    if strategy == "linear":
        return [head]
    if strategy != "gradual":
        raise MlexpError(f"--strategy must be one of full, linear, gradual, got {strategy!r}")
    if unfreeze_patterns:
        parts = phase_regexes(unfreeze_patterns)
        return [_either(*parts[:index + 1]) for index in range(len(parts))]
    middle = _top_of_network(model, family) or _last_group(model, re.compile(head).match)
    if middle is None:
        if family != "other":
            warnings.warn(f"gradual unfreezing: {type(model).__name__} does not have the layout of a "
                          f"{family} model; unfreezing head -> everything", stacklevel=2)
        return [head, EVERYTHING]
    return [head, _either(head, middle), EVERYTHING]


# --- layer-wise LR decay ---------------------------------------------------------------------

def _last_group(model: nn.Module, is_head) -> str | None:
    """The parameters of the model's top group below the classifier, by timm's group_matcher."""
    if not hasattr(model, "group_matcher"):
        return None
    from timm.models import group_parameters
    try:
        raw = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    except (NotImplementedError, TypeError, AttributeError):
        return None
    body = {name: group for name, group in raw.items() if not is_head(name)}
    if len(set(body.values())) < 2:
        return None
    top = max(body.values())
    return "^(?:" + "|".join(re.escape(name) for name, group in body.items() if group == top) + ")$"


def layer_ids(model: nn.Module, is_head, unfreeze_patterns: str | None = None) -> tuple[dict[str, int], int]:
    """Depth of every parameter (0 = stem), with the classifier alone on top; returns (ids, head_id).

    Body layers come from --unfreeze-patterns (one layer per pattern: the first the name matches,
    from the head down), else timm's `group_matcher` (resnet: stem, each block, ...; vit: stem,
    each block, final norm with the last block); models without one get one layer per top-level child.
    """
    names = [n for n, _ in model.named_parameters()]
    raw: dict[str, int] = {}
    if unfreeze_patterns:
        parts = [re.compile(part).match for part in phase_regexes(unfreeze_patterns)]
        raw = {n: len(parts) - next((i for i, matches in enumerate(parts) if matches(n)), len(parts)) for n in names}
    elif hasattr(model, "group_matcher"):
        from timm.models import group_parameters
        try:
            raw = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        except (NotImplementedError, TypeError, AttributeError):
            raw = {}
    if not raw:
        order = {child: i for i, (child, _) in enumerate(model.named_children())}
        raw = {n: order.get(n.split(".")[0], 0) for n in names}
    last = max(raw.values(), default=0)
    body = {n: raw.get(n, last) for n in names if not is_head(n)}
    rank = {layer: i for i, layer in enumerate(sorted(set(body.values())))}
    ids = {n: rank[layer] for n, layer in body.items()}
    head_id = len(rank)
    ids.update({n: head_id for n in names if is_head(n)})
    return ids, head_id


def _no_decay_patterns(model: nn.Module) -> set[str]:
    """timm models name parameters that must not decay (pos_embed, cls_token, bias tables)."""
    no_weight_decay = getattr(model, "no_weight_decay", None)
    return set(no_weight_decay()) if callable(no_weight_decay) else set()


# --- the strategy -------------------------------------------------------------------------------

class Strategy:
    """Which parameters train in which phase; built by `build_strategy`.

    Holds the unwrapped model (the same Parameter objects that DDP / Accelerate wrap).
    The loop's order of calls per epoch:
        strategy.train_mode(model)                    # instead of model.train()
        per step: backward (all-reduce) -> strategy.drop_frozen_grads() -> clip -> optimizer.step()
        evaluate -> strategy.on_epoch_end(epoch, val_loss) -> strategy.should_stop(epochs_done)
    `val_loss` must be the same on every process (the all-reduced one), or ranks change phase apart.
    """

    def __init__(self, name: str, model: nn.Module, patterns: list[str], cfg: TrainConfig) -> None:
        self.name = name
        self.model = model
        self.patterns = patterns
        self.cfg = cfg
        self.phase = 0
        self.best_val_loss: float | None = None
        self.epochs_without_improvement = 0
        self._is_head = re.compile(_prefix_pattern(classifier_names(model))).match
        self._no_decay = _no_decay_patterns(model)
        # Parameters the model itself created fixed (e.g. fixed sin-cos position embeddings) stay fixed.
        self._fixed = {n for n, p in model.named_parameters() if not p.requires_grad}
        for pname, param in model.named_parameters():
            if pname in self._fixed:
                continue
            # linear: the backbone is never un-frozen, so requires_grad=False is safe under DDP.
            # full/gradual: everything requires grad from the start (DDP registers it at wrap time).
            param.requires_grad_(name != "linear" or bool(self._is_head(pname)))
        self._apply_phase()

    # --- phases ---
    @property
    def num_phases(self) -> int:
        return len(self.patterns)

    @property
    def pattern(self) -> str:
        """The regex of parameter names trainable in the current phase."""
        return self.patterns[self.phase]

    def _apply_phase(self) -> None:
        trainable = re.compile(self.pattern).match
        params = dict(self.model.named_parameters())
        self._trainable_names = {n for n in params if trainable(n) and n not in self._fixed}
        self._frozen_params = [p for n, p in params.items() if n not in self._trainable_names]
        # Top-most modules with nothing trainable inside: these run in eval mode.
        self._frozen_modules: list[nn.Module] = []
        frozen_prefixes: list[str] = []
        for name, module in self.model.named_modules():
            if not name or trainable(name) or any(name.startswith(p + ".") for p in frozen_prefixes):
                continue
            if any(f"{name}.{pn}" in self._trainable_names for pn, _ in module.named_parameters()):
                continue
            self._frozen_modules.append(module)
            frozen_prefixes.append(name)

    def is_trainable(self, param_name: str) -> bool:
        return param_name in self._trainable_names

    # --- optimizer ---
    def _no_decay_param(self, name: str, param: nn.Parameter) -> bool:
        return param.ndim <= 1 or any(fnmatch.fnmatch(name, p) for p in self._no_decay)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Groups for `optim.build_optimizer`: 'params', 'weight_decay', 'lr_scale' (+ 'layer_id').

        full: one group per (layer, decay/no-decay); lr_scale = llrd_decay ** (head_id - layer_id),
        so each layer's scale is the layer above's times llrd_decay and the classifier's is 1.0.
        linear: classifier only. gradual: every parameter, lr_scale 1.0 (frozen ones idle via
        drop_frozen_grads). 1-D parameters and timm's no_weight_decay() names get no weight decay.
        """
        named = [(n, p) for n, p in self.model.named_parameters() if n not in self._fixed]
        if self.name == "linear":
            named = [(n, p) for n, p in named if self._is_head(n)]
        if self.name == "full":
            ids, head_id = layer_ids(self.model, self._is_head, self.cfg.unfreeze_patterns)
        else:
            ids, head_id = {n: 0 for n, _ in named}, 0
        groups: dict[tuple[int, bool], dict] = {}
        for name, param in named:
            layer, decay = ids[name], not self._no_decay_param(name, param)
            group = groups.setdefault((layer, decay), {
                "params": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": self.cfg.llrd_decay ** (head_id - layer), "layer_id": layer,
            })
            group["params"].append(param)
        return [groups[key] for key in sorted(groups)]

    # --- per step / per epoch ---
    def drop_frozen_grads(self) -> None:
        """After backward (and DDP's all-reduce), before clipping and optimizer.step()."""
        if self.name != "gradual":
            return
        for param in self._frozen_params:
            param.grad = None

    def train_mode(self, model: nn.Module) -> None:
        """`model.train()` (model may be the DDP wrapper), then frozen parts back to eval mode."""
        model.train()
        for module in self._frozen_modules:
            module.eval()

    def on_epoch_end(self, epoch: int, val_loss: float) -> bool:
        """Gradual: next phase after `gradual_patience` epochs without a lower val loss. True if it changed."""
        if self.name != "gradual":
            return False
        if self.cfg.gradual_patience == 0:  # ULMFiT's original schedule: one more group every epoch
            if self.phase == self.num_phases - 1:
                return False
            self.phase += 1
            self._apply_phase()
            return True
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = float(val_loss)
            self.epochs_without_improvement = 0
            return False
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement < self.cfg.gradual_patience or self.phase == self.num_phases - 1:
            return False
        self.phase += 1
        self.epochs_without_improvement = 0   # the new phase gets a full patience to beat the best
        self._apply_phase()
        return True

    def should_stop(self, epoch: int) -> bool:
        """`epoch` = epochs finished so far (= 0-based index of the next epoch).

        Linear probe: True once `linear_probe_epochs` have run. Others: False.
        """
        return self.name == "linear" and epoch >= self.cfg.linear_probe_epochs

    def trainable_params(self) -> int:
        """Parameters that can change in the current phase."""
        return sum(p.numel() for n, p in self.model.named_parameters() if n in self._trainable_names)

    # --- resume ---
    def state_dict(self) -> dict:
        return {"strategy": self.name, "phase": self.phase, "best_val_loss": self.best_val_loss,
                "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        if state.get("strategy", self.name) != self.name:
            raise MlexpError(f"cannot resume a {state['strategy']!r} run with --strategy {self.name}")
        self.phase = min(int(state.get("phase", 0)), self.num_phases - 1)
        best = state.get("best_val_loss")
        self.best_val_loss = None if best is None else float(best)
        self.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))
        self._apply_phase()

    def __repr__(self) -> str:
        return f"Strategy({self.name}, phase {self.phase}/{self.num_phases - 1}, trainable={self.pattern!r})"


def build_strategy(model: nn.Module, family: str, cfg: TrainConfig) -> Strategy:
    """The strategy `cfg.strategy` for this (unwrapped, head-attached) model.

    Call before wrapping the model (DDP/accelerator.prepare) and before building the optimizer:
    it sets requires_grad (linear: backbone off for good; full/gradual: everything on).
    """
    return Strategy(cfg.strategy, model, phase_patterns(model, family, cfg.strategy, cfg.unfreeze_patterns), cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["attach_head", "build_strategy", "classifier_names", "count_params", "layer_ids",
           "phase_patterns", "Strategy"]
