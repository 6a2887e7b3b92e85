"""A task of a user's own, written as the README's "Your own task" shows: regression of how much
ink a handwritten digit holds (the mean of its pixels), with a loss of two parts. mlexp trains
it over any backbone, logs its loss parts every batch and its metrics every epoch, checkpoints
and resumes it, sweeps and compares it, and (with example_input and predict) logs it as an
MLflow model that `mlflow models serve` answers with."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from mlexp.data.images import DataBundle
from mlexp.errors import MlexpError


def as_input(digits: np.ndarray, img_size: int) -> torch.Tensor:
    """8 x 8 digits (values 0..16) -> the network's input: (N, 3, img_size, img_size)."""
    pixels = torch.as_tensor(np.asarray(digits), dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear").repeat(1, 3, 1, 1)
    return (images - 0.5) / 0.5


class InkDigits(Dataset):
    def __init__(self, images: np.ndarray, img_size: int):
        self.images = images
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        ink = torch.as_tensor(self.images[index], dtype=torch.float32).mean() / 16.0 * 4  # the target, about 0..1
        return as_input(self.images[index][None], self.img_size)[0], ink


class InkRegression:
    name = "ink"
    components = ("loss_mse", "loss_l1")  # logged as batch/loss_mse, train/loss_mse, ...
    metrics = ("loss", "mae", "r2")       # evaluate's keys: logged as val/mae each epoch, test/mae at the end
    primary_metric = "val/r2"             # chooses the best epoch (and what compare measures)
    higher_is_better = True               # its direction (by its name alone, mlexp would guess the same)
    collate = None                        # torch's default batching

    def check_data(self, cfg) -> None:
        if cfg.data != "digits":
            raise MlexpError(f"--task ink reads the built-in digits, not {cfg.data!r}")

    def build_data(self, cfg) -> DataBundle:
        images = load_digits().images
        order = np.random.default_rng(cfg.seed).permutation(len(images))
        train, val, test = np.split(order, [int(0.7 * len(order)), int(0.85 * len(order))])
        sets = [InkDigits(images[part], cfg.img_size) for part in (train, val, test)]
        return DataBundle(sets[0], sets[1], 1, ["ink"], "digits-ink", sets[2])

    def build_model(self, spec, backbone, cfg, num_classes):
        return backbone  # built with one output (num_classes=1): the ink

    def loss(self, model, images, targets, loss_fn):
        predicted = model(images).squeeze(1)
        mse, l1 = F.mse_loss(predicted, targets), 0.1 * F.l1_loss(predicted, targets)
        return mse + l1, {"loss_mse": mse, "loss_l1": l1}, None

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, class_names):
        model.eval()
        predicted, truth = [], []
        for images, targets in loader:
            predicted.append(accelerator.gather_for_metrics(model(images).squeeze(1)))
            truth.append(accelerator.gather_for_metrics(targets))
        p, t = torch.cat(predicted).float(), torch.cat(truth).float()
        residual = float(((p - t) ** 2).sum())
        return {"loss": residual / len(t), "mae": float((p - t).abs().mean()),
                "r2": 1.0 - residual / max(float(((t - t.mean()) ** 2).sum()), 1e-12)}, []

    # Serving (optional): what a client sends, and what the served model answers for it.
    def example_input(self, data) -> np.ndarray:
        return np.stack([data.val_set.images[0], data.val_set.images[1]])  # two 8 x 8 digits, as loaded

    @torch.no_grad()
    def predict(self, model, inputs: np.ndarray, cfg) -> list[dict]:
        predicted = model.eval()(as_input(inputs, cfg.img_size)).squeeze(1)
        return [{"ink": float(value)} for value in predicted]
