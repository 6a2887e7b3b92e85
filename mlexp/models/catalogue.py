"""The backbone catalogue: names -> timm models, pretrained or scratch (building them: `models.build`).

A catalogue name is `<arch>_<init>` (`resnet50_scratch`), an alias (`resnet50` means
`resnet50_pretrained`), one of mlexp's own small-image ViTs (`vit_small`, `vit_base`,
scratch only), or any timm model name together with an explicit init. Both flavours of
an arch build the *same* network, so a pretrained/scratch pair differs only in its
starting weights; `BackboneSpec.arch` is the key that pairs them. Where weights come from
is `mlexp.models.weight_sources`; how a file is loaded and checked, `mlexp.models.weight_files`.

Importing this module does not import torch or timm (about 3 s together): catalogue names
and aliases resolve from the static table below, so `mlexp train` can reject a typo or
missing offline weights before paying for them. Only names outside the catalogue consult
timm's registry; tests check the static table against timm so it cannot drift.
"""

# Imported where used: `timm` and `torch` (about 3 s), because `mlexp --help` and the option
# checks resolve names here before either loads (a typo fails in under 2 s).
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field, replace

from mlexp.errors import MlexpError
from mlexp.models.plugins import load_plugins, plugin_reference, register_factory

INITS = ("pretrained", "scratch")

# timm's module for an architecture -> the family that fine-tuning phases key on.
_MODULE_FAMILY = {
    "resnet": "resnet",
    "vgg": "vgg",
    "vision_transformer": "vit",
    "deit": "vit",
    "swin_transformer": "swin",
}


@dataclass(frozen=True)
class TimmSource:
    """Where timm's default pretrained weights for a model live: the fields of timm's
    pretrained_cfg that mlexp reads (the catalogue holds them statically, see backbones)."""

    hf_hub_id: str = ""  # "timm/resnet50.a1_in1k" (optionally "@revision")
    hf_hub_filename: str | None = None  # None: model.safetensors, else pytorch_model.bin
    url: str = ""  # a plain download URL (cached under torch hub's checkpoints/)
    file: str = ""


def timm_source(timm_name: str) -> TimmSource | None:
    """timm's pretrained cfg for a model name, read from timm (imports timm: ~3 s)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    return None if cfg is None else TimmSource(cfg.hf_hub_id or "", cfg.hf_hub_filename or None,
                                               cfg.url or "", cfg.file or "")


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: which timm model, initialised how."""

    name: str  # catalogue name ("resnet50_scratch") or a plain timm name
    arch: str  # architecture without init suffix; pairs pretrained vs scratch (tag mlexp.backbone)
    timm_name: str
    init: str  # "pretrained" | "scratch"
    family: str  # "resnet" | "vgg" | "vit" | "swin" | "other"
    default_img_size: int  # the size the arch is designed (or its weights were trained) for
    timm_kwargs: dict = field(default_factory=dict)  # static extra kwargs for timm.create_model
    weights_hint: str = ""  # where pretrained weights come from, for the catalogue table
    fixed_input_size: bool = False  # timm builds it for one input size: img_size must be passed
    auto_patch: bool = False  # mlexp's own ViTs: patch size follows img_size (see vit_patch_size)
    timm_weights: TimmSource | None = None  # timm's default pretrained weights, if known without timm
    plugin: str = ""  # a user's own network: the name that resolves it again ("module:factory", models.plugins)

    def with_in_chans(self, in_chans: int) -> BackboneSpec:
        """The same backbone built for `in_chans` input channels (--in-chans)."""
        if in_chans == 3:
            return self
        return replace(self, timm_kwargs={**self.timm_kwargs, "in_chans": in_chans})

    def create_kwargs(self, img_size: int) -> dict:
        """Every kwarg for timm.create_model at this input size (besides num_classes)."""
        kwargs = dict(self.timm_kwargs)
        if self.fixed_input_size:
            kwargs["img_size"] = img_size
        if self.auto_patch:
            kwargs["patch_size"] = vit_patch_size(img_size)
        if self.family == "swin":
            kwargs["window_size"] = swin_window_size(img_size, patch=_swin_patch(self.timm_name))
        return kwargs


def split_model_name_tag(name: str) -> tuple[str, str]:
    """timm's split of a model name into arch and pretrained tag ("resnet50.a1_in1k" ->
    ("resnet50", "a1_in1k")), without importing timm."""
    arch, _, tag = name.partition(".")
    return arch, tag


# --- sizing rules for small images ------------------------------------------------------


def vit_patch_size(img_size: int) -> int:
    """mlexp's ViTs keep about an 8x8 token grid on small images (patch 4 at 32 px, 8 at 64 px)
    and the usual 16-px patches from 128 px up; the patch always divides the image."""
    cap = max(4, min(16, img_size // 8))
    return next(p for p in (16, 8, 4, 2, 1) if p <= cap and img_size % p == 0)


def swin_window_size(img_size: int, patch: int = 4) -> int:
    """A Swin window that tiles the first stage exactly: 7 where the grid is a multiple of 7
    (224 px: the ImageNet window), else the largest of 8/4/2 giving at least 2x2 windows
    (32 px -> 8x8 tokens -> window 4; 64 px -> 16x16 -> 8). Deeper stages halve the grid;
    timm shrinks the window to a stage's grid when the grid is smaller."""
    grid = max(1, img_size // patch)
    if grid % 7 == 0 and grid >= 28:
        return 7
    for window in (8, 4, 2):
        if grid % window == 0 and window <= grid // 2:
            return window
    return grid


def _swin_patch(timm_name: str) -> int:
    """The patch size a timm Swin name spells ("swin_small_patch4_window7_224" -> 4)."""
    for part in split_model_name_tag(timm_name)[0].split("_"):
        if part.startswith("patch") and part[5:].isdigit():
            return int(part[5:])
    return 4


# --- the catalogue ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    arch: str
    timm_name: str
    family: str
    inits: tuple[str, ...] = INITS
    timm_kwargs: dict = field(default_factory=dict)
    default_img_size: int = 224
    auto_patch: bool = False
    fixed_input_size: bool = False  # timm's pretrained_cfg.fixed_input_size
    # timm's default pretrained cfg (hf_hub_id, hf_hub_filename, url) for pretrained archs.
    timm_weights: TimmSource | None = None


# The static facts about timm below (fixed_input_size, default pretrained weights) are what
# timm 1.0 reports; tests/models/test_backbones.py checks them against the installed timm.
_ARCHS = (
    _Arch("resnet18", "resnet18", "resnet", timm_weights=TimmSource(
        "timm/resnet18.a1_in1k", url="https://github.com/huggingface/pytorch-image-models/releases/"
        "download/v0.1-rsb-weights/resnet18_a1_0-d63eafa0.pth")),
    _Arch("resnet50", "resnet50", "resnet", timm_weights=TimmSource(
        "timm/resnet50.a1_in1k", url="https://github.com/rwightman/pytorch-image-models/releases/"
        "download/v0.1-rsb-weights/resnet50_a1_0-14fe96d1.pth")),
    # timm's VGG keeps the ImageNet classifier MLP as a 7x7 ConvMlp; on small inputs it
    # adaptive-pools the (1x1 at 32 px) feature map up to 7x7 first, so ImageNet weights load
    # unchanged and 32 px works (checked in tests).
    _Arch("vgg16", "vgg16", "vgg", timm_weights=TimmSource("timm/vgg16.tv_in1k")),
    _Arch("deit_small", "deit_small_patch16_224", "vit", fixed_input_size=True, timm_weights=TimmSource(
        "timm/deit_small_patch16_224.fb_in1k",
        url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth")),
    _Arch("swin_small", "swin_small_patch4_window7_224", "swin", fixed_input_size=True, timm_weights=TimmSource(
        "timm/swin_small_patch4_window7_224.ms_in22k_ft_in1k",
        url="https://github.com/SwinTransformer/storage/releases/download/v1.0.8/"
            "swin_small_patch4_window7_224_22kto1k_finetune.pth")),
    # mlexp's own ViTs for small images: ViT-S/ViT-B widths with a patch that follows img_size.
    _Arch("vit_small", "vit_small_patch16_224", "vit", ("scratch",),
          dict(embed_dim=384, depth=12, num_heads=6), 32, auto_patch=True, fixed_input_size=True),
    _Arch("vit_base", "vit_base_patch16_224", "vit", ("scratch",),
          dict(embed_dim=768, depth=12, num_heads=12), 32, auto_patch=True, fixed_input_size=True),
)
_ARCH_BY_NAME = {a.arch: a for a in _ARCHS}


def _catalogue_name(arch: _Arch, init: str) -> str:
    return arch.arch if arch.inits == ("scratch",) else f"{arch.arch}_{init}"


def _timm_hint(source: TimmSource | None) -> str:
    if source is None or not (source.hf_hub_id or source.url or source.file):
        return "none in timm"
    return f"timm: {source.hf_hub_id.split('/', 1)[-1] if source.hf_hub_id else source.url}"


def _spec_from_arch(arch: _Arch, init: str) -> BackboneSpec:
    if init == "pretrained":
        hint = _timm_hint(arch.timm_weights)
    else:
        hint = "none (scratch only)" if arch.inits == ("scratch",) else "none (scratch)"
    return BackboneSpec(
        name=_catalogue_name(arch, init), arch=arch.arch, timm_name=arch.timm_name, init=init,
        family=arch.family, default_img_size=arch.default_img_size, timm_kwargs=dict(arch.timm_kwargs),
        weights_hint=hint, fixed_input_size=arch.fixed_input_size, auto_patch=arch.auto_patch,
        timm_weights=arch.timm_weights if init == "pretrained" else None,
    )


CATALOGUE: dict[str, tuple[_Arch, str]] = {
    _catalogue_name(a, init): (a, init) for a in _ARCHS for init in a.inits
}
# Plain arch names default to the pretrained flavour (the seed's backward compatibility).
ALIASES: dict[str, str] = {a.arch: f"{a.arch}_pretrained" for a in _ARCHS if "pretrained" in a.inits}
# The timm names of catalogue archs resolve to the catalogue (same sizing rules, same pairing key).
_TIMM_TO_ARCH = {a.timm_name: a for a in _ARCHS if a.inits == INITS}


def init_suffix(name: str) -> str | None:
    """The init a name's last `_` part spells, typos included ("resnet50_scracth" -> "scratch").

    mlexp's names carry an init suffix and no timm model name ends in anything like one
    (checked in tests), so a near-miss of a catalogue name is reported without loading
    timm's registry (~3 s)."""
    arch = split_model_name_tag(name)[0]
    if "_" not in arch:
        return None
    last = arch.rsplit("_", 1)[1]
    close = difflib.get_close_matches(last, INITS, n=1, cutoff=0.8)
    return close[0] if close else None


def _fixed_input_size(timm_name: str) -> bool:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _family(timm_name: str) -> str:
    from timm.models import model_entrypoint

    module = model_entrypoint(split_model_name_tag(timm_name)[0]).__module__.rsplit(".", 1)[-1]
    return _MODULE_FAMILY.get(module, "other")


# --- resolution -------------------------------------------------------------------------


def resolve_backbone(name: str, init: str = "auto", plugins: str | None = None) -> BackboneSpec:
    """Turn what the user typed (catalogue name, alias, a model of the user's own or a timm name,
    plus --init and --plugins) into a spec.

    Catalogue names, aliases, the timm names of catalogue archs and names with an init suffix
    (typos of ours) resolve or fail without importing timm; other names ask timm's registry,
    after the plugin modules have registered theirs."""
    if init not in ("auto", *INITS):
        raise MlexpError(f"--init must be one of auto, pretrained, scratch, got {init!r}")
    name = name.strip()
    load_plugins(plugins)
    if name in CATALOGUE:
        arch, fixed_init = CATALOGUE[name]
        if init not in ("auto", fixed_init):
            if arch.inits == ("scratch",):
                raise MlexpError(
                    f"{name} is mlexp's own ViT and is always trained from scratch; for a pretrained "
                    f"ViT use deit_small_pretrained or a timm name (e.g. vit_small_patch16_224) with "
                    f"--init pretrained")
            raise MlexpError(f"--init {init} contradicts backbone {name}; use "
                             f"{_catalogue_name(arch, init)} (or leave --init auto)")
        return _spec_from_arch(arch, fixed_init)
    if name in ALIASES:
        arch = _ARCH_BY_NAME[name]
        return _spec_from_arch(arch, "pretrained" if init == "auto" else init)
    base = split_model_name_tag(name)[0]
    if name in _TIMM_TO_ARCH:  # a catalogue arch by its timm name: same sizing rules, same pairing key
        if init == "auto":
            raise _needs_init(name, base)
        return _spec_from_arch(_TIMM_TO_ARCH[name], init)
    reference = plugin_reference(name)
    if reference is not None:
        return _plugin_spec(register_factory(*reference), name, init)
    our_typo = init_suffix(name) is not None  # not a timm name: no need to ask timm
    if not our_typo and _is_timm_model(name):
        if init == "auto":
            raise _needs_init(name, base)
        source = timm_source(name) if init == "pretrained" else None
        return BackboneSpec(
            name=name, arch=base, timm_name=name, init=init, family=_family(name),
            default_img_size=_default_img_size(name), timm_kwargs={},
            weights_hint=_timm_hint(source) if init == "pretrained" else "none (scratch)",
            fixed_input_size=_fixed_input_size(name), timm_weights=source,
        )
    raise MlexpError(_unknown_message(name))


def _plugin_spec(timm_name: str, reference: str, init: str) -> BackboneSpec:
    """A user's own network: like a catalogue alias, its plain name means the pretrained flavour."""
    init = "pretrained" if init == "auto" else init
    return BackboneSpec(name=timm_name, arch=timm_name, timm_name=timm_name, init=init, family=_family(timm_name),
                        default_img_size=_default_img_size(timm_name),
                        weights_hint="weights folder or --weights" if init == "pretrained" else "none (scratch)",
                        plugin=reference)


def _is_timm_model(name: str) -> bool:
    from timm.models import is_model  # the first timm import: ~3 s

    return is_model(name)


def _needs_init(name: str, base: str) -> MlexpError:
    hint = ""
    if base in _TIMM_TO_ARCH:
        hint = f" (or use the catalogue names {_TIMM_TO_ARCH[base].arch}_pretrained/_scratch)"
    return MlexpError(f"backbone {name!r} is a timm model name, not a catalogue name: pass "
                      f"--init pretrained or --init scratch{hint}")


def _default_img_size(timm_name: str) -> int:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def _close_catalogue_names(name: str) -> list[str]:
    """Catalogue names close to `name`; for a name with an init suffix, close in its arch part,
    with the init spelled right ("resnt50_scracth" -> resnet50_scratch, resnet18_scratch)."""
    init = init_suffix(name)
    if init is None:
        return difflib.get_close_matches(name, list(CATALOGUE) + list(ALIASES), n=3, cutoff=0.6)
    bare = split_model_name_tag(name)[0].rsplit("_", 1)[0]
    archs = difflib.get_close_matches(bare, list(_ARCH_BY_NAME), n=3, cutoff=0.6)
    return [_catalogue_name(_ARCH_BY_NAME[a], init) for a in archs]


def _unknown_message(name: str) -> str:
    """Suggestions from the catalogue; timm's ~1,400 names (and timm's import, ~3 s) only when
    the catalogue has too few and the name is not one of ours with a typo."""
    close = _close_catalogue_names(name)
    init = init_suffix(name)
    if not close or (init is None and len(close) < 3):
        from timm.models import list_models

        if init is not None:  # `convnext_atto_pretrained`: a timm arch plus our suffix
            bare = split_model_name_tag(name)[0].rsplit("_", 1)[0]
            timm_close = difflib.get_close_matches(bare, list_models(), n=1, cutoff=0.75)
            if timm_close:
                return (f"unknown backbone {name!r}: not in the catalogue; for timm's {timm_close[0]} use "
                        f"--backbone {timm_close[0]} --init {init}. See `mlexp backbones`.")
        else:
            close += [m for m in difflib.get_close_matches(name, list_models(), n=3, cutoff=0.75)
                      if m not in close][: 3 - len(close)]
    others = f" (or {', '.join(close[1:])})" if len(close) > 1 else ""
    suggestion = f"; did you mean {close[0]}{others}?" if close else "."
    return f"unknown backbone {name!r}{suggestion} See `mlexp backbones` (any timm model name also works)."


# --- the catalogue table ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _params_millions(timm_name: str, kwargs_items: tuple) -> float:
    """Backbone parameters without the classifier, counted on the meta device (no memory)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **dict(kwargs_items))
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def catalogue_rows() -> list[dict]:
    """One row per catalogue name, then one per alias (`alias_of` names its target; "" otherwise)."""
    rows = []
    for name in CATALOGUE:
        spec = resolve_backbone(name)
        kwargs = spec.create_kwargs(spec.default_img_size)
        rows.append(dict(
            name=name, timm_model=spec.timm_name, init=spec.init, family=spec.family,
            params_m=_params_millions(spec.timm_name, tuple(sorted(kwargs.items()))),
            img_size=spec.default_img_size, weights=spec.weights_hint, alias_of="",
        ))
    by_name = {row["name"]: row for row in rows}
    for alias, target in ALIASES.items():
        rows.append(dict(by_name[target], name=alias, alias_of=target))
    return rows


def format_catalogue(rows: list[dict] | None = None) -> str:
    """The `mlexp backbones` table as plain text."""
    rows = catalogue_rows() if rows is None else rows
    header = ("name", "timm model", "init", "family", "params (M)", "img size", "weights source")
    body = [(r["name"] if not r["alias_of"] else f"{r['name']} -> {r['alias_of']}", r["timm_model"],
             r["init"], r["family"], f"{r['params_m']:.1f}", str(r["img_size"]), r["weights"])
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("Any other timm model name works too, with --init pretrained or --init scratch. "
                 "Params exclude the classifier.")
    return "\n".join(lines)
