"""Temperature scaling (Guo et al., 2017): one scalar T dividing the logits, fitted on the
validation split by minimising NLL. It changes confidence, never the predicted class, so
accuracy is untouched and only NLL / ECE move.

Inputs are the validation logits [N, C] and labels [N] (tensors or arrays, any device);
all maths runs in float64 on the CPU. Outputs are plain floats (the tracker never sees a tensor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A fitted T outside this range means the fit ran away (e.g. perfectly separable logits,
# whose NLL keeps falling as T -> 0); clamp it. The NLL guard below still applies.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def _tensors(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long)
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"expected logits [N, C] and labels [N] with N > 0, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return logits, labels


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    logits, labels = _tensors(logits, labels)
    return float(F.cross_entropy(logits / temperature, labels))


def ece(logits, labels, temperature: float = 1.0, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| over equal-width confidence bins,
    weighted by the fraction of samples in each bin."""
    logits, labels = _tensors(logits, labels)
    confidence, predicted = torch.softmax(logits / temperature, dim=1).max(dim=1)
    correct = predicted.eq(labels).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            total += float(in_bin.to(torch.float64).mean() * gap)
    return total


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising validation NLL (LBFGS on log T); 1.0 if no T does better than 1."""
    logits, labels = _tensors(logits, labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    temperature = min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)
    # The guarantee: never worse than leaving the logits alone.
    return temperature if nll(logits, labels, temperature) < nll(logits, labels, 1.0) else 1.0


def calibrate(logits, labels) -> dict[str, float]:
    """Fit T on these (validation) logits; the metrics before and after, as logged to MLflow."""
    logits, labels = _tensors(logits, labels)
    temperature = fit_temperature(logits, labels)
    return {
        "calib/temperature": temperature,
        "calib/nll_before": nll(logits, labels, 1.0),
        "calib/nll_after": nll(logits, labels, temperature),
        "calib/ece_before": ece(logits, labels, 1.0),
        "calib/ece_after": ece(logits, labels, temperature),
    }
