"""Annotated images as tensors for torchvision's detectors: each image resized to
`img_size` x `img_size` (its boxes with it) and scaled to 0..1 (the detector normalises
inputs itself), and its target: boxes in pixels of the resized image, labels counted from 1
(torchvision's detectors keep 0 for the background)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mlexp.data.stacks import channels_of, is_stack, load_stack, resized, unit_tensor
from mlexp.errors import MlexpError
from mlexp.tasks.detection.annotations import AnnotatedImage


class DetectionImages(Dataset):
    def __init__(self, images: list[AnnotatedImage], img_size: int, root: Path | None = None,
                 in_chans: int = 3) -> None:
        self.images, self.img_size, self.in_chans = images, img_size, in_chans
        # as an ImageFolder has them: split digests and the duplicate check read (path, label) and root
        self.root = str(root or (images[0].path.parent if images else "."))
        self.samples = [(str(item.path), annotations_line(item)) for item in images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        item = self.images[index]
        pixels = detector_input(read_pixels(item, self.in_chans), self.img_size, self.in_chans, item.path)
        boxes = torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4) * self.img_size
        return pixels, {"boxes": boxes, "labels": torch.tensor(item.labels, dtype=torch.int64) + 1}


def read_pixels(item: AnnotatedImage, in_chans: int):
    """An annotated image as read: a picture, a stack, or (--bands) one array of its channels
    followed by its band files' (the type that holds them all, as one stack file of them would be)."""
    image = load_stack(item.path) if is_stack(item.path, in_chans) else Image.open(item.path)
    if not item.bands:
        return image
    parts = [channels_of(image.convert("RGB") if isinstance(image, Image.Image) else image)]
    for band in item.bands:
        part = channels_of(load_stack(band) if is_stack(band, in_chans) else Image.open(band))
        if part.shape[:2] != parts[0].shape[:2]:
            raise MlexpError(f"{band}: {part.shape[1]}x{part.shape[0]} pixels, but its image {item.path} has "
                             f"{parts[0].shape[1]}x{parts[0].shape[0]}")
        parts.append(part)
    return np.concatenate(parts, axis=-1)


def detector_input(image, img_size: int, in_chans: int = 3, path: Path | None = None) -> torch.Tensor:
    """An image (PIL) or a stack (array, --in-chans) as a detector takes it, in training and
    when served alike: bilinear to `img_size` square, channels x height x width in 0..1."""
    if in_chans == 3 and isinstance(image, Image.Image):
        picture = image.convert("RGB").resize((img_size, img_size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    array = channels_of(image)
    if array.shape[-1] != in_chans:
        raise MlexpError(f"{path or 'an image'}: {array.shape[-1]} channel(s) where --in-chans is {in_chans}")
    return resized(unit_tensor(array), img_size).contiguous()


def annotations_line(item: AnnotatedImage) -> str:
    """An image's annotations in one line (a split's digest changes when a box does)."""
    return json.dumps([[label, *(round(v, 5) for v in box)] for label, box in zip(item.labels, item.boxes)])


def collate(batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images stacked (they share one size); targets kept as a list (each image has its own box count)."""
    return torch.stack([pixels for pixels, _ in batch]), [target for _, target in batch]
