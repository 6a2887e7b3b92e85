"""Temperature scaling on real logits (a logistic regression on the real digits data)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mlexp.training.calibration import MIN_TEMPERATURE, calibrate, ece, fit_temperature, nll


@pytest.fixture(scope="module")
def val_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Validation logits of a softmax regression trained on 1,000 real digit images."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, val = order[:1000], order[1000:]
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x[val])
    assert (logits.argmax(1) == y[val]).float().mean() > 0.85
    return logits, y[val]


def test_over_confident_logits_get_a_temperature_above_one(val_logits):
    logits, labels = val_logits
    result = calibrate(logits * 5, labels)
    assert set(result) == {"calib/temperature", "calib/nll_before", "calib/nll_after",
                           "calib/ece_before", "calib/ece_after"}
    assert all(isinstance(v, float) for v in result.values())
    assert result["calib/temperature"] > 1.5
    assert result["calib/nll_after"] < result["calib/nll_before"]
    assert result["calib/ece_after"] < result["calib/ece_before"]
    # T only rescales: the fit on x5 logits recovers roughly 5x the fit on the original ones.
    assert result["calib/temperature"] == pytest.approx(5 * fit_temperature(logits, labels), rel=1e-3)


def test_under_confident_logits_get_a_temperature_below_one(val_logits):
    logits, labels = val_logits
    temperature = fit_temperature(logits / 5, labels)
    assert temperature < 1.0
    assert nll(logits / 5, labels, temperature) < nll(logits / 5, labels)


def test_never_worse_than_temperature_one():
    generator = torch.Generator().manual_seed(1)
    for trial in range(5):
        logits = torch.randn(64, 5, generator=generator) * (trial + 1)
        labels = torch.randint(0, 5, (64,), generator=generator)
        result = calibrate(logits, labels)
        assert result["calib/nll_after"] <= result["calib/nll_before"]
    # Uninformative logits: no temperature helps, so T stays exactly 1.
    assert fit_temperature(torch.zeros(10, 3), torch.arange(10) % 3) == 1.0
    # Perfectly separable logits want T -> 0: the fit stops (or is clamped) above MIN_TEMPERATURE.
    labels = torch.arange(20) % 4
    separable = F.one_hot(labels, 4).float() * 3
    temperature = fit_temperature(separable, labels)
    assert MIN_TEMPERATURE <= temperature < 1.0
    assert nll(separable, labels, temperature) < nll(separable, labels)


def test_ece_of_a_known_case():
    # Two samples, both predicted with confidence ~0.731 (logit gap 1), one right, one wrong.
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    confidence = torch.sigmoid(torch.tensor(1.0)).item()
    assert ece(logits, labels) == pytest.approx(abs(0.5 - confidence))
    with pytest.raises(ValueError):
        ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
