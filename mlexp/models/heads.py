"""Which module of a network is its classifier: one documented rule for every model.

  1. timm's `get_classifier()` (every timm model, and plugins built like one);
  2. the classifier a model declares in its `pretrained_cfg` / `default_cfg` (`{"classifier": "fc"}`,
     timm's own convention for a model's head);
  3. the last `nn.Linear` in the network (a plain CNN of the user's own).

The run logs which rule found it (param `classifier`): the classifier is what a linear probe
trains, what gradual unfreezing starts with, what sits on top of the layer-wise LR decay, and
the only part a pretrained file for another class count may leave out.
"""

from __future__ import annotations

from torch import nn

from mlexp.errors import MlexpError


def find_classifier(model: nn.Module) -> tuple[list[str], str]:
    """(module paths of the classifier(s), the rule that found them)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        found = get_classifier()
        wanted = list(found) if isinstance(found, (tuple, list)) else [found]
        names = [name for name, module in model.named_modules() if name and any(module is w for w in wanted)]
        if names and len(names) == len(wanted):
            return names, "get_classifier()"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    declared = cfg.get("classifier") if isinstance(cfg, dict) else None
    if declared:
        names = [declared] if isinstance(declared, str) else list(declared)
        if all(_has_params(model, name) for name in names):
            return names, "pretrained_cfg['classifier']"
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if linears:
        return [linears[-1]], "last nn.Linear"
    raise MlexpError(f"cannot find the classifier of {type(model).__name__}: give it timm's get_classifier(), "
                     "declare it (model.pretrained_cfg = {'classifier': 'fc'}), or end it with an nn.Linear")


def classifier_names(model: nn.Module) -> list[str]:
    """Module paths of the model's classifier(s): 'fc' (resnet), 'head' (vit), 'head.fc' (swin, vgg)."""
    return find_classifier(model)[0]


def _has_params(model: nn.Module, name: str) -> bool:
    try:
        return any(True for _ in model.get_submodule(name).parameters())
    except AttributeError:
        return False
