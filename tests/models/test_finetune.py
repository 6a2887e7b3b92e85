"""Fine-tuning strategies on real (tiny) timm models: what trains, what stays frozen, LLRD."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vgg import VGG
from torch import nn

from mlexp.config import TrainConfig
from mlexp.errors import MlexpError
from mlexp.models.strategies import attach_head, build_strategy, classifier_names
from mlexp.training.optimizer import build_optimizer, build_scheduler, lr_multiplier

torch.set_num_threads(2)


def resnet() -> nn.Module:
    return timm.create_model("resnet18", num_classes=10)


def vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)


def swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=24,
                             depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1), num_classes=10)


def vgg() -> nn.Module:   # vgg11_bn's layout with few channels (the real one has 130M parameters)
    return VGG([16, "M", 32, "M", 32, 32, "M", 64, 64, "M"], num_classes=10, mlp_ratio=1 / 16,
               norm_layer=nn.BatchNorm2d)


MODELS = {"resnet": resnet, "vit": vit, "swin": swin, "vgg": vgg}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BN running stats, num_batches_tracked), copied."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {name for name, tensor in model.state_dict().items() if not torch.equal(before[name], tensor)}


def train_steps(model: nn.Module, strategy, optimizer, steps: int = 3, scheduler=None) -> None:
    """Real training steps, in the loop's order: train_mode, backward, drop_frozen_grads, clip, step."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        strategy.train_mode(model)
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator)
        F.cross_entropy(model(images), labels).backward()
        strategy.drop_frozen_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


def trainable_names(strategy) -> set[str]:
    return {n for n, _ in strategy.model.named_parameters() if strategy.is_trainable(n)}


# --- heads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(MODELS))
def test_mlp_head_replaces_the_classifier_and_outputs_num_classes(family):
    model = MODELS[family]()
    expected = {"resnet": "fc", "vit": "head", "swin": "head.fc", "vgg": "head.fc"}[family]
    assert classifier_names(model) == [expected]
    in_features = model.get_submodule(expected).in_features
    attach_head(model, "mlp", 7)
    mlp = model.get_submodule(expected)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].p, mlp[3].out_features) == (in_features, 512, 0.3, 7)
    assert model.get_classifier() is mlp
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_linear_head_is_kept_or_resized():
    model = resnet()
    fc = model.fc
    attach_head(model, "linear", 10)
    assert model.fc is fc
    attach_head(model, "linear", 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(MlexpError):
        attach_head(model, "transformer", 3)


# --- linear probe --------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_linear_probe_changes_only_the_head_and_never_the_batchnorm_statistics(head):
    model = resnet()
    attach_head(model, head, 10)
    cfg = TrainConfig(strategy="linear", lr=1e-2, weight_decay=0.05, linear_probe_epochs=2)
    strategy = build_strategy(model, "resnet", cfg)
    optimizer = build_optimizer(strategy.param_groups(cfg.weight_decay), cfg)
    head_params = {id(p) for p in model.fc.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == head_params
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))
    before = snapshot(model)

    train_steps(model, strategy, optimizer, steps=4)

    moved = changed(before, model)
    assert moved and all(name.startswith("fc.") for name in moved)
    assert {n for n in before if n.startswith("fc.") and n.endswith("weight")} <= moved
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.fc.training and model.training
    assert strategy.trainable_params() == sum(p.numel() for p in model.fc.parameters())
    assert [strategy.should_stop(e) for e in (1, 2, 3)] == [False, True, True]
    assert strategy.on_epoch_end(1, 0.5) is False


# --- gradual unfreezing ---------------------------------------------------------------------------

def phase_names(strategy) -> list[set[str]]:
    names = []
    for phase in range(strategy.num_phases):
        strategy.load_state_dict({"strategy": "gradual", "phase": phase})
        names.append(trainable_names(strategy))
    strategy.load_state_dict({"strategy": "gradual", "phase": 0})
    return names


def test_gradual_phases_on_resnet_name_head_then_layer4_then_everything():
    model = resnet()
    strategy = build_strategy(model, "resnet", TrainConfig(strategy="gradual"))
    everything = {n for n, _ in model.named_parameters()}
    head, top, full = phase_names(strategy)
    assert head == {"fc.weight", "fc.bias"}
    assert top == head | {n for n in everything if n.startswith("layer4.")}
    assert full == everything


def test_gradual_phases_on_vit_name_head_then_norm_and_last_two_blocks():
    model = vit()
    strategy = build_strategy(model, "vit", TrainConfig(strategy="gradual"))
    everything = {n for n, _ in model.named_parameters()}
    head, top, full = phase_names(strategy)
    assert head == {"head.weight", "head.bias"}
    # Anchored: 'norm' is the final norm only, not blocks.*.norm1 (an unanchored regex would match those).
    expected = head | {"norm.weight", "norm.bias"} | {n for n in everything if n.startswith(("blocks.10.", "blocks.11."))}
    assert top == expected
    assert full == everything


def test_gradual_phases_on_swin_and_vgg():
    model = swin()
    head, top, _ = phase_names(build_strategy(model, "swin", TrainConfig(strategy="gradual")))
    names = {n for n, _ in model.named_parameters()}
    assert head == {"head.fc.weight", "head.fc.bias"}
    assert top == head | {"norm.weight", "norm.bias"} | {n for n in names if n.startswith("layers.3.")}

    model = vgg()
    head, top, _ = phase_names(build_strategy(model, "vgg", TrainConfig(strategy="gradual")))
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    last_block = {f"features.{i}." for i in range(pools[-2] + 1, len(model.features))}
    names = {n for n, _ in model.named_parameters()}
    assert head == {"head.fc.weight", "head.fc.bias"}
    assert top == head | {n for n in names if n.startswith("pre_logits.") or n.startswith(tuple(last_block))}
    assert any(n.startswith("features.") for n in top)


def test_other_family_unfreezes_head_then_the_model_s_last_group_then_everything():
    """Outside the known families the model says where its stages are (timm's group_matcher: for
    a ResNet its last stage); a model that does not say goes head -> everything."""
    model = resnet()
    phases = phase_names(build_strategy(model, "other", TrainConfig(strategy="gradual")))
    assert len(phases) == 3 and phases[0] == {"fc.weight", "fc.bias"}
    assert {name.split(".")[0] for name in phases[1] - phases[0]} == {"layer4"}
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 10))
    assert len(phase_names(build_strategy(plain, "other", TrainConfig(strategy="gradual")))) == 2
    with pytest.raises(MlexpError):
        build_strategy(model, "alexnet", TrainConfig(strategy="gradual"))


def test_gradual_frozen_params_stay_bit_identical_through_adamw_with_weight_decay():
    model = resnet()
    cfg = TrainConfig(strategy="gradual", lr=1e-2, weight_decay=0.1, gradual_patience=1)
    strategy = build_strategy(model, "resnet", cfg)
    optimizer = build_optimizer(strategy.param_groups(cfg.weight_decay), cfg)
    # Everything is in the optimizer and requires grad, in every phase: DDP registers it all at wrap time.
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    counts = [strategy.trainable_params()]

    before = snapshot(model)
    train_steps(model, strategy, optimizer)
    assert changed(before, model) == {"fc.weight", "fc.bias"}   # no weight decay, no BN statistics elsewhere
    assert all(p.requires_grad for p in model.parameters())
    frozen = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert not any(p in optimizer.state for p in frozen)   # no Adam moments for frozen params

    assert strategy.on_epoch_end(1, 1.0) is False
    assert strategy.on_epoch_end(2, 1.0) is True   # patience 1: one epoch without improvement
    counts.append(strategy.trainable_params())
    before = snapshot(model)
    train_steps(model, strategy, optimizer)
    moved = changed(before, model)
    assert {n for n in moved if not n.startswith("fc.")} and all(n.startswith(("fc.", "layer4.")) for n in moved)
    assert "layer4.0.bn1.running_mean" in moved and "layer3.0.bn1.running_mean" not in moved

    assert strategy.on_epoch_end(3, 1.0) is True
    counts.append(strategy.trainable_params())
    before = snapshot(model)
    train_steps(model, strategy, optimizer)
    assert "conv1.weight" in changed(before, model) and "bn1.running_var" in changed(before, model)
    assert counts[0] < counts[1] < counts[2] == sum(p.numel() for p in model.parameters())


def test_gradual_train_mode_puts_only_frozen_parts_in_eval():
    model = vit()
    strategy = build_strategy(model, "vit", TrainConfig(strategy="gradual"))
    strategy.load_state_dict({"strategy": "gradual", "phase": 1})
    strategy.train_mode(model)
    assert model.training and model.blocks.training and model.head.training and model.norm.training
    assert model.blocks[11].training and model.blocks[10].training
    assert not model.blocks[9].training and not model.blocks[0].attn.training and not model.patch_embed.training


def test_gradual_patience_logic_and_state_round_trip():
    model = resnet()
    cfg = TrainConfig(strategy="gradual", gradual_patience=2)
    strategy = build_strategy(model, "resnet", cfg)
    losses = [1.0, 0.9, 0.95, 0.92, 0.8, 0.85, 0.81, 0.7, 0.9, 0.9, 0.9]
    changes = [strategy.on_epoch_end(epoch, loss) for epoch, loss in enumerate(losses, 1)]
    #          1.0    0.9    0.95   0.92  0.8    0.85   0.81  0.7    0.9    0.9   0.9(last phase: stays)
    assert changes == [False, False, False, True, False, False, True, False, False, False, False]
    assert strategy.phase == 2
    strategy.phase = 1
    strategy.load_state_dict(strategy.state_dict() | {"phase": 1})
    state = strategy.state_dict()
    assert json.loads(json.dumps(state)) == state   # plain python types
    assert state == {"strategy": "gradual", "phase": 1, "best_val_loss": 0.7, "epochs_without_improvement": 3}

    resumed = build_strategy(resnet(), "resnet", cfg)
    resumed.load_state_dict(state)
    assert (resumed.phase, resumed.best_val_loss, trainable_names(resumed)) == (1, 0.7, trainable_names(strategy))
    with pytest.raises(MlexpError):
        build_strategy(resnet(), "resnet", TrainConfig(strategy="linear")).load_state_dict(state)


# --- full fine-tuning with layer-wise LR decay ---------------------------------------------------

def lr_by_layer(optimizer) -> list[float]:
    by_layer: dict[int, float] = {}
    for group in optimizer.param_groups:
        assert by_layer.setdefault(group["layer_id"], group["lr"]) == pytest.approx(group["lr"], rel=1e-12)
    return [by_layer[layer] for layer in sorted(by_layer)]


@pytest.mark.parametrize("make, layers", [(resnet, 10), (vit, 14)], ids=["resnet18", "vit_tiny"])
@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_llrd_ratios_survive_every_schedule(make, layers, scheduler):
    model = make()
    steps_per_epoch, steps = 2, 5
    cfg = TrainConfig(strategy="full", llrd_decay=0.7, lr=1e-3, scheduler=scheduler, warmup_epochs=1.0,
                      epochs=4, step_size=1, gamma=0.5)
    strategy = build_strategy(model, "other", cfg)
    optimizer = build_optimizer(strategy.param_groups(cfg.weight_decay), cfg)
    schedule = build_scheduler(optimizer, cfg, steps_per_epoch)
    train_steps(model, strategy, optimizer, steps=steps, scheduler=schedule)

    lrs = lr_by_layer(optimizer)
    assert len(lrs) == layers
    for lower, upper in zip(lrs, lrs[1:]):
        assert lower / upper == pytest.approx(0.7, rel=1e-9)
    expected_top = cfg.lr * lr_multiplier(cfg, steps_per_epoch)(steps)
    assert max(lrs) == lrs[-1] == pytest.approx(expected_top, rel=1e-12)
    if scheduler != "none":
        assert expected_top < cfg.lr   # the schedule really moved, and LLRD moved with it
    head = {id(p) for p in model.get_classifier().parameters()}
    top_groups = [g for g in optimizer.param_groups if g["layer_id"] == max(g["layer_id"] for g in optimizer.param_groups)]
    assert {id(p) for g in top_groups for p in g["params"]} == head   # the classifier alone on top, scale 1.0
    assert strategy.trainable_params() == sum(p.numel() for p in model.parameters())


def test_llrd_decay_one_gives_every_group_the_base_lr_and_no_decay_rules():
    model = vit()
    attach_head(model, "mlp", 10)
    cfg = TrainConfig(strategy="full", llrd_decay=1.0, lr=1e-3)
    strategy = build_strategy(model, "vit", cfg)
    groups = strategy.param_groups(0.05)
    assert {g["lr_scale"] for g in groups} == {1.0}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay and "head.0.weight" not in no_decay
    top = max(g["layer_id"] for g in groups)
    assert {names[id(p)] for g in groups if g["layer_id"] == top for p in g["params"]} == {
        "head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"}
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_parameters_the_model_created_fixed_stay_fixed():
    model = vit()
    model.pos_embed.requires_grad_(False)   # like a fixed sin-cos position embedding
    strategy = build_strategy(model, "vit", TrainConfig(strategy="gradual"))
    in_groups = {id(p) for g in strategy.param_groups(0.05) for p in g["params"]}
    assert id(model.pos_embed) not in in_groups and not model.pos_embed.requires_grad
    strategy.load_state_dict({"strategy": "gradual", "phase": 2})
    total = sum(p.numel() for p in model.parameters())
    assert strategy.trainable_params() == total - model.pos_embed.numel()


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_the_fused_optimizer_makes_the_same_updates_as_torchs_default(optimizer_name):
    """Training uses torch's fused kernels on CPU and CUDA, the default loop elsewhere (here:
    an XLA device). Both must move every parameter alike (up to float rounding), decay included."""
    cfg = TrainConfig(optimizer=optimizer_name, lr=1e-2, weight_decay=0.1, momentum=0.9)
    models = [resnet(), resnet()]
    models[1].load_state_dict(models[0].state_dict())
    start = snapshot(models[0])
    optimizers = [build_optimizer(build_strategy(model, "resnet", cfg).param_groups(cfg.weight_decay), cfg, device)
                  for model, device in zip(models, ["cpu", "xla"])]
    assert [optimizer.defaults["fused"] for optimizer in optimizers] == [True, False]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the same gradients for both (Adam's sign-like early steps would amplify any difference)
        images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
        F.cross_entropy(models[0](images), labels).backward()
        for fused_param, plain_param in zip(models[0].parameters(), models[1].parameters()):
            plain_param.grad = fused_param.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    fused, plain = (dict(model.named_parameters()) for model in models)
    assert all(torch.allclose(fused[name], plain[name], rtol=1e-4, atol=1e-6) for name in fused)
    assert {"conv1.weight", "fc.weight"} <= changed(start, models[0])  # the updates were not both no-ops
