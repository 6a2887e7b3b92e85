"""Linear CKA: its defining properties, then two real tiny models on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlexp.analysis.features import PENULTIMATE, cka_matrix, linear_cka, representations
from mlexp.config import TrainConfig
from mlexp.data.sources import build_data
from mlexp.models.build import create_model
from mlexp.models.catalogue import resolve_backbone


def test_identical_rotated_and_scaled_representations_give_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 50))
    rotation, _ = np.linalg.qr(rng.normal(size=(50, 50)))  # orthogonal
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0)
    assert linear_cka(x, 0.1 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, np.tanh(x)) < 0.999  # a non-linear change is seen


def test_independent_random_representations_are_near_zero_at_any_width():
    """The bound: |CKA| < 0.05 for 400 examples, for narrow (20) and wide (2,000) features;
    the plain estimator would give about p / (n + p) = 0.83 for the wide ones."""
    rng = np.random.default_rng(1)
    for width in (20, 2000):
        x, y = rng.normal(size=(400, width)), rng.normal(size=(400, width))
        assert abs(linear_cka(x, y)) < 0.05, width


def test_two_real_tiny_models_layer_by_layer():
    cfg = TrainConfig(data="digits", img_size=16)
    images = torch.stack([build_data(cfg).val_set[i][0] for i in range(128)])
    spec = resolve_backbone("resnet18_scratch")
    torch.manual_seed(0)
    first = create_model(spec, 10, 16)
    torch.manual_seed(1)
    second = create_model(spec, 10, 16)
    names, grams = representations(first, images)
    assert names == ["act1", "layer1", "layer2", "layer3", "layer4", PENULTIMATE]
    same = cka_matrix(grams, grams)
    assert np.diag(same) == pytest.approx(np.ones(len(names)))
    _, other = representations(second, images)
    across = np.diag(cka_matrix(grams, other))
    # two random initialisations: similar near the pixels, less so deeper in (but never 1)
    assert across[0] > 0.5 and all(value < 0.999 for value in across)
    assert across[0] > across[-1]
