"""The catalogue: names, aliases, resolution errors, and every entry building and training on CPU."""

from __future__ import annotations

import pytest
import torch

from mlexp.errors import MlexpError
from mlexp.models.build import build_backbone, create_model
from mlexp.models.catalogue import (
    ALIASES,
    CATALOGUE,
    catalogue_rows,
    format_catalogue,
    resolve_backbone,
    swin_window_size,
    vit_patch_size,
)

NAMES = [f"{arch}_{init}" for arch in ("resnet18", "resnet50", "vgg16", "deit_small", "swin_small")
         for init in ("pretrained", "scratch")] + ["vit_small", "vit_base"]


def test_catalogue_rows_list_every_name_and_alias():
    rows = catalogue_rows()
    assert [r["name"] for r in rows if not r["alias_of"]] == NAMES
    aliases = {r["name"]: r["alias_of"] for r in rows if r["alias_of"]}
    assert aliases == {a: f"{a}_pretrained" for a in ("resnet18", "resnet50", "vgg16", "deit_small", "swin_small")}
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet50_scratch"]["timm_model"] == "resnet50"
    assert by_name["resnet50_pretrained"]["weights"].startswith("timm: resnet50.")
    assert by_name["vit_small"]["init"] == "scratch" and by_name["vit_small"]["img_size"] == 32
    assert 20 < by_name["resnet50_pretrained"]["params_m"] < 27
    table = format_catalogue(rows)
    assert "swin_small_scratch" in table and "deit_small -> deit_small_pretrained" in table


@pytest.mark.parametrize("name, init, expected_name, expected_init", [
    ("resnet50", "auto", "resnet50_pretrained", "pretrained"),
    ("resnet50", "scratch", "resnet50_scratch", "scratch"),
    ("deit_small", "pretrained", "deit_small_pretrained", "pretrained"),
    ("resnet50_scratch", "scratch", "resnet50_scratch", "scratch"),
    ("vit_base", "auto", "vit_base", "scratch"),
    ("deit_small_patch16_224", "scratch", "deit_small_scratch", "scratch"),  # timm name of a catalogue arch
    ("convnext_atto", "pretrained", "convnext_atto", "pretrained"),
])
def test_resolve(name, init, expected_name, expected_init):
    spec = resolve_backbone(name, init)
    assert (spec.name, spec.init) == (expected_name, expected_init)


def test_pairs_share_arch_and_network():
    pre, scr = resolve_backbone("swin_small_pretrained"), resolve_backbone("swin_small_scratch")
    assert pre.arch == scr.arch == "swin_small" and pre.family == "swin"
    assert pre.create_kwargs(32) == scr.create_kwargs(32)
    assert [resolve_backbone(n).family for n in ("resnet18", "vgg16", "deit_small", "vit_small")] == \
        ["resnet", "vgg", "vit", "vit"]
    assert resolve_backbone("convnext_atto", "scratch").family == "other"


@pytest.mark.parametrize("name, init, words", [
    ("resnt50_scratch", "auto", ["unknown backbone 'resnt50_scratch'", "did you mean resnet50_scratch",
                                 "mlexp backbones"]),
    ("resnet50_scratch", "pretrained", ["contradicts", "resnet50_pretrained"]),
    ("vit_small", "pretrained", ["always trained from scratch"]),
    ("convnext_atto", "auto", ["--init pretrained or --init scratch"]),
])
def test_resolve_errors(name, init, words):
    with pytest.raises(MlexpError) as info:
        resolve_backbone(name, init)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_small_image_sizing_rules():
    assert [vit_patch_size(s) for s in (28, 32, 64, 96, 224)] == [4, 4, 8, 8, 16]
    assert [swin_window_size(s) for s in (32, 64, 128, 224)] == [4, 8, 8, 7]
    assert resolve_backbone("vit_small").create_kwargs(32) == dict(embed_dim=384, depth=12, num_heads=6,
                                                                   img_size=32, patch_size=4)
    assert resolve_backbone("swin_small").create_kwargs(64) == dict(img_size=64, window_size=8)
    assert resolve_backbone("resnet50").create_kwargs(32) == {}


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_trains_one_step_at_32px(name):
    torch.manual_seed(0)
    spec = resolve_backbone(name)
    # Pretrained entries need weights (tested in test_weights); build the same network bare here.
    model = create_model(spec, num_classes=3, img_size=32) if spec.init == "pretrained" else \
        build_backbone(spec, num_classes=3, img_size=32).model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params[:2]] + [params[-1].detach().clone()]
    optimizer = torch.optim.SGD(params, lr=0.1)  # SGD: no optimizer state, keeps vgg16 cheap
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    optimizer.step()
    after = [p.detach() for p in params[:2]] + [params[-1].detach()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("name", ["deit_small_scratch", "swin_small_scratch", "vit_small", "vit_base"])
def test_transformers_build_at_64px(name):
    built = build_backbone(resolve_backbone(name), num_classes=4, img_size=64)
    assert built.weights_source == "none" and built.loaded_tensors == 0
    with torch.no_grad():
        assert built.model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_aliases_are_the_pretrained_entries():
    for alias, target in ALIASES.items():
        assert target in CATALOGUE and resolve_backbone(alias).name == target


def test_scratch_refuses_weights(tmp_path):
    with pytest.raises(MlexpError, match="from scratch"):
        build_backbone(resolve_backbone("resnet18_scratch"), 3, 32, weights=str(tmp_path / "w.safetensors"))


# --- the static catalogue facts cannot drift from timm ---------------------------------------


def test_static_timm_facts_match_timm():
    """The catalogue resolves without timm, from facts copied from timm: check them against it."""
    from timm.models import get_pretrained_cfg

    from mlexp.models.catalogue import _ARCHS, TimmSource, _family, timm_source

    for arch in _ARCHS:
        cfg = get_pretrained_cfg(arch.timm_name)  # the default tag, as timm.create_model(pretrained=True) uses
        assert arch.fixed_input_size == bool(cfg.fixed_input_size), arch.arch
        assert arch.family == _family(arch.timm_name), arch.arch
        if "pretrained" in arch.inits:
            assert arch.timm_weights == timm_source(arch.timm_name), arch.arch
            assert arch.timm_weights == TimmSource(cfg.hf_hub_id, cfg.hf_hub_filename, cfg.url or "", cfg.file or "")
            spec = resolve_backbone(f"{arch.arch}_pretrained")
            assert spec.weights_hint == f"timm: {cfg.hf_hub_id.split('/', 1)[-1]}"
            assert spec.timm_weights.hf_hub_id == f"timm/{arch.timm_name}.{cfg.tag}"
        else:
            assert arch.timm_weights is None


def test_no_timm_model_name_ends_in_anything_like_an_init_suffix():
    """Why `resnt50_scratch` can be called a typo without loading timm's registry."""
    from timm.models import list_models

    from mlexp.models.catalogue import init_suffix

    assert not [name for name in list_models() if init_suffix(name)]
    assert [init_suffix(n) for n in ("resnet50_scratch", "resnet50_scracth", "resnt50_pretrain", "resnet50",
                                     "vit_small", "deit_small_patch16_224.fb_in1k")] == \
        ["scratch", "scratch", "pretrained", None, None, None]


@pytest.mark.parametrize("name, words", [
    ("resnt50_scracth", "did you mean resnet50_scratch (or resnet18_scratch)?"),
    ("resnet50_pretrain", "did you mean resnet50_pretrained"),
    ("vit_smal_scratch", "did you mean vit_small"),
    ("convnext_atto_pretrained", "for timm's convnext_atto use --backbone convnext_atto --init pretrained"),
    ("convnxt_atto_scratch", "for timm's convnext_atto use --backbone convnext_atto --init scratch"),
    ("zzz_scratch", "unknown backbone 'zzz_scratch'. See `mlexp backbones`"),
])
def test_typos_of_our_names_are_suggested_from_the_catalogue_first(name, words):
    with pytest.raises(MlexpError) as info:
        resolve_backbone(name)
    assert words in str(info.value)


def test_timm_name_of_a_catalogue_arch_needs_an_init():
    with pytest.raises(MlexpError, match="deit_small_pretrained/_scratch"):
        resolve_backbone("deit_small_patch16_224")
    spec = resolve_backbone("convnext_atto", "pretrained")
    assert spec.timm_weights is not None and spec.timm_weights.hf_hub_id.startswith("timm/convnext_atto.")
