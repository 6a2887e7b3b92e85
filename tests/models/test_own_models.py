"""A user's own architecture (tests/own_model/mymodels.py, defined nowhere in mlexp): resolving it,
building it, its classifier, partial weights with a report, prefix renames, and stages by pattern."""

from __future__ import annotations

import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models import model_entrypoint, register_model
from torch import nn

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.models.build import build_backbone, create_model
from mlexp.models.catalogue import resolve_backbone
from mlexp.models.heads import find_classifier
from mlexp.models.plugins import _entry_point_backbones, copy_plugin_sources, plugin_requirements
from mlexp.models.strategies import build_strategy
from mlexp.models.weight_sources import locate_weights

OWN_MODEL = Path(__file__).parents[1] / "own_model" / "mymodels.py"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project folder holding mymodels.py, as the working folder; the module is
    forgotten afterwards (another test may write another mymodels.py)."""
    shutil.copy(OWN_MODEL, tmp_path / "mymodels.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLEXP_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("mymodels", "badmodels")]:
        del sys.modules[name]


def test_module_factory_is_a_backbone_like_a_timm_name(project):
    spec = resolve_backbone("mymodels:twistnet_tiny", "scratch")
    assert (spec.name, spec.arch, spec.init, spec.family, spec.plugin) == (
        "twistnet_tiny", "twistnet_tiny", "scratch", "other", "mymodels:twistnet_tiny")
    model = create_model(spec, num_classes=7, img_size=16)
    assert type(model).__name__ == "TwistNet" and model.fc.out_features == 7
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
    # its plain name means the pretrained flavour, as a catalogue alias does
    assert resolve_backbone("mymodels:twistnet_tiny").init == "pretrained"


def test_pretrained_own_model_finds_pt_files_by_prefix_and_says_where_it_looked(project):
    spec = resolve_backbone("mymodels:twistnet_tiny", "pretrained")
    with pytest.raises(MlexpError) as missing:
        locate_weights(spec, None)
    assert "twistnet_tiny.safetensors, twistnet_tiny.pt, twistnet_tiny.pth, twistnet_tiny_*.safetensors" \
        in str(missing.value)
    (project / "weights").mkdir()
    torch.save(create_model(spec, 10, 16).state_dict(), project / "weights" / "twistnet_tiny_imagenet.pt")
    assert locate_weights(spec, None).path.name == "twistnet_tiny_imagenet.pt"


@pytest.mark.parametrize("source, error", [
    ("def net(num_classes=10):\n    raise RuntimeError('oops')\nimport nonexistent_package\n",
     "cannot import module 'badmodels' (ModuleNotFoundError"),
    ("def net(classes=10):\n    pass\n", "net() must take num_classes"),
    ("def resnet18(num_classes=10, **kwargs):\n    pass\n", "'resnet18' is also a timm model"),
    ("x = 1\n", "has no function 'net'"),
])
def test_bad_own_models_say_what_is_wrong(project, source, error):
    (project / "badmodels.py").write_text(source)
    factory = "resnet18" if "resnet18" in source else "net"
    with pytest.raises(MlexpError, match=re.escape(error)):
        resolve_backbone(f"badmodels:{factory}", "scratch")


def test_classifier_rule_get_classifier_then_declared_then_last_linear(project):
    timm_model = create_model(resolve_backbone("resnet18_scratch"), 3, 32)
    assert find_classifier(timm_model) == (["fc"], "get_classifier()")
    own = create_model(resolve_backbone("mymodels:twistnet_tiny", "scratch"), 3, 16)
    assert find_classifier(own) == (["fc"], "last nn.Linear")
    declared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    declared.pretrained_cfg = {"classifier": "0"}
    assert find_classifier(declared) == (["0"], "pretrained_cfg['classifier']")


def _independent_counts(variant: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    target = variant.state_dict()
    loaded = [k for k in target if k in state and state[k].shape == target[k].shape]
    return len(loaded), len(target) - len(loaded), len(state) - len(loaded)


def test_ablation_variant_loads_partially_and_reports_exactly_what(project):
    full = create_model(resolve_backbone("mymodels:twistnet_tiny", "scratch"), 5, 16)
    save_file(full.state_dict(), project / "full.safetensors")
    variant_spec = resolve_backbone("mymodels:twistnet_tiny_no_twist", "pretrained")
    with pytest.raises(MlexpError, match="not in the model .*--weights-strict false"):
        build_backbone(variant_spec, 10, 16, str(project / "full.safetensors"))
    built = build_backbone(variant_spec, 10, 16, str(project / "full.safetensors"), strict=False)
    report = built.load_report
    state = load_file(project / "full.safetensors")
    assert (len(report.loaded), len(report.new), len(report.unused)) == _independent_counts(built.model, state)
    assert sorted(report.new) == ["fc.bias", "fc.weight"]  # 5 classes in the file, 10 here
    assert report.summary().endswith("2 new: fc.*; 6 in the file unused: fc.*, twist.*")
    for name in report.loaded:
        assert torch.equal(built.model.state_dict()[name], state[name])


def test_a_checkpoint_under_a_prefix_with_a_decoder_loads_with_a_key_map(project):
    spec = resolve_backbone("mymodels:twistnet_tiny", "pretrained")
    donor = create_model(spec, 10, 16).state_dict()
    wrapped = {f"encoder.{k}": v for k, v in donor.items() if not k.startswith("fc.")}
    wrapped.update({"decoder.proj.weight": torch.ones(3, 3), "decoder.proj.bias": torch.ones(3)})
    torch.save({"model": wrapped}, project / "mae.pth")
    with pytest.raises(MlexpError, match="--weights-key-map"):
        build_backbone(spec, 10, 16, str(project / "mae.pth"))
    built = build_backbone(spec, 10, 16, str(project / "mae.pth"), strict=False, key_map="encoder.=")
    assert sorted(built.load_report.unused) == ["decoder.proj.bias", "decoder.proj.weight"]
    assert sorted(built.load_report.new) == ["fc.bias", "fc.weight"]
    assert "2 in the file unused: decoder.*" in built.load_report.summary()
    assert torch.equal(built.model.stem[0].weight, donor["stem.0.weight"])
    with pytest.raises(MlexpError, match="expected OLD=NEW"):
        build_backbone(spec, 10, 16, str(project / "mae.pth"), strict=False, key_map="encoder.")


def test_unfreeze_patterns_decide_the_phases_and_the_lr_layers(project):
    model = create_model(resolve_backbone("mymodels:twistnet_tiny", "scratch"), 10, 16)
    sizes = {prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
             for prefix in ("fc.", "layer2.", "twist.")}
    cfg = TrainConfig(strategy="gradual", gradual_patience=0, unfreeze_patterns="fc;layer2|twist;.*")
    strategy = build_strategy(model, "other", cfg)
    curve = []
    for epoch in range(3):
        curve.append(strategy.trainable_params())
        strategy.on_epoch_end(epoch, 1.0)
    assert curve == [sizes["fc."], sizes["fc."] + sizes["layer2."] + sizes["twist."],
                     sum(p.numel() for p in model.parameters())]
    full = build_strategy(model, "other", cfg.replace(strategy="full", llrd_decay=0.5))
    scales = {round(group["lr_scale"], 3) for group in full.param_groups(0.05)}
    assert scales == {1.0, 0.5, 0.25}  # head, the middle pattern, everything else
    with pytest.raises(MlexpError, match="not a regular expression"):
        build_strategy(model, "other", cfg.replace(unfreeze_patterns="fc;layer2["))


def test_plugins_register_timm_names_and_may_not_replace_timm_s_own(project, monkeypatch):
    (project / "regmodels.py").write_text(
        "from timm.models import register_model\nfrom mymodels import TwistNet\n\n"
        "@register_model\ndef twistnet_registered(pretrained=False, num_classes=1000, **kwargs):\n"
        "    return TwistNet(num_classes)\n")
    spec = resolve_backbone("twistnet_registered", "scratch", plugins="regmodels")
    assert type(create_model(spec, 4, 16)).__name__ == "TwistNet"
    (project / "clashing.py").write_text(
        "from timm.models import register_model\nfrom mymodels import TwistNet\n\n"
        "@register_model\ndef resnet10t(pretrained=False, num_classes=1000, **kwargs):\n    return TwistNet(num_classes)\n")
    monkeypatch.setenv("MLEXP_PLUGINS", "clashing")
    original = model_entrypoint("resnet10t")
    try:
        with pytest.raises(MlexpError, match="registers resnet10t, already a timm model"):
            resolve_backbone("resnet18_scratch", plugins=None)
    finally:  # timm's own resnet10t back, for the tests after this one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            register_model(original)


def test_a_package_names_its_factories_as_entry_points(project):
    """An installed package's `mlexp.backbones` entry points: its metadata on sys.path is enough."""
    info = project / "twistpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twistpkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlexp.backbones]\ntwist_from_package = mymodels:twistnet_tiny\n")
    sys.path.insert(0, str(project))
    _entry_point_backbones.cache_clear()  # read once per process: this test installs one after the start
    spec = resolve_backbone("twist_from_package", "scratch")
    assert (spec.arch, spec.plugin) == ("twist_from_package", "twist_from_package")
    assert type(create_model(spec, 3, 16)).__name__ == "TwistNet"


def test_an_installed_package_travels_as_a_requirement_and_a_local_module_as_source(project):
    site = project / "venv" / "lib" / "site-packages"
    (site / "twistpkg").mkdir(parents=True)
    (site / "twistpkg" / "__init__.py").write_text("from mymodels import twistnet_tiny\n")
    info = site / "twistpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twistpkg\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("twistpkg\n")
    sys.path.insert(0, str(site))
    resolve_backbone("twistpkg:twistnet_tiny", "scratch")
    assert plugin_requirements("twistpkg:twistnet_tiny", None) == ["twistpkg==1.0"]
    assert copy_plugin_sources("twistpkg:twistnet_tiny", None, project / "code") == []
    resolve_backbone("mymodels:twistnet_tiny", "scratch")
    assert plugin_requirements("mymodels:twistnet_tiny", None) == []
    assert [p.name for p in copy_plugin_sources("mymodels:twistnet_tiny", None, project / "code")] == ["mymodels.py"]
    sys.modules.pop("twistpkg", None)


def test_weights_key_map_is_repeatable_on_the_command_line(project):
    from click.testing import CliRunner

    from mlexp.commands.cli import cli

    done = CliRunner().invoke(cli, ["train", "--backbone", "mymodels:twistnet_tiny", "--init", "scratch", "--dry-run",
                                    "--weights-key-map", "encoder.=", "--weights-key-map", "backbone.=net."])
    assert done.exit_code == 0, done.output
    from mlexp.config import key_map_pairs

    assert key_map_pairs("encoder.=,backbone.=net.") == [("encoder.", ""), ("backbone.", "net.")]
