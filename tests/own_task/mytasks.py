"""A task of a user's own, written as the README's "Your own task" shows: regression of how much
ink a handwritten digit holds (the mean of its pixels), with a loss of two parts. mlexp trains
it over any backbone, logs its loss parts every batch and its metrics every epoch, checkpoints
and resumes it, sweeps and compares it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from mlexp.data.images import DataBundle
from mlexp.errors import MlexpError


class InkDigits(Dataset):
    def __init__(self, images: np.ndarray, img_size: int):
        self.images = images
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        pixels = torch.from_numpy(self.images[index]).float()[None, None] / 16.0  # 8 x 8, values 0..16
        image = F.interpolate(pixels, size=(self.img_size, self.img_size), mode="bilinear")[0].repeat(3, 1, 1)
        return (image - 0.5) / 0.5, pixels.mean() * 4  # the target: ink, about 0..1


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
