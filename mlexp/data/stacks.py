"""Images with other than three channels (`--in-chans N`): RGB plus depth, thermal, or any
other band, stacked in one file per image: a NumPy array (NAME.npy, height x width x channels)
or a TIFF (NAME.tif: interleaved or planar bands, 8 to 64 bits, read by tifffile). A run with
three channels reads a TIFF as a picture, as before; a .npy of three channels it takes too.

A stack becomes a float tensor as an image file becomes 8-bit RGB (mlexp.data.images.to_rgb8):
uint8 values by 255, any other type by the stack's own min..max range to 0..1. Then it is resized
to `--img-size` square, flipped like the backbone's RGB images are in training, and normalised
with the backbone's mean and std, repeated over the channels as timm repeats a pretrained stem's
RGB filters over them (channel n takes RGB channel n mod 3's).
"""

# Imported where used: `tifffile`, which only TIFF stacks need.
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlexp.errors import MlexpError

STACK_SUFFIX = ".npy"
TIFF_SUFFIXES = (".tif", ".tiff")


def is_stack(path: str | Path, in_chans: int = 3) -> bool:
    """Read as an array of bands, not as a picture: a .npy always; a TIFF in a run of other than
    three channels."""
    name = str(path).lower()
    return name.endswith(STACK_SUFFIX) or (in_chans != 3 and name.endswith(TIFF_SUFFIXES))


def load_stack(path: str | Path) -> np.ndarray:
    """A stack file as a height x width x channels array (a .npy never unpickles: plain arrays only)."""
    array = load_tiff(path) if str(path).lower().endswith(TIFF_SUFFIXES) else np.load(path, allow_pickle=False)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise MlexpError(f"{path}: a stack is a numeric height x width x channels array, got {array.dtype} "
                         f"{array.shape}")
    return array


def load_tiff(path: str | Path) -> np.ndarray:
    """A TIFF's first image as height x width x bands, whichever way it stores its bands
    (interleaved: YXS; planar or as pages: SYX, CYX, QYX)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            array, axes = series.asarray(), series.axes
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
        reason = "no image in it" if isinstance(error, IndexError) else error
        raise MlexpError(f"{path}: not a readable TIFF ({reason})") from None
    bands = [index for index, axis in enumerate(axes) if axis not in "YX"]
    if "Y" not in axes or "X" not in axes or len(bands) > 1:
        raise MlexpError(f"{path}: a TIFF stack is one image of bands (height x width x bands), got axes {axes} "
                         f"{array.shape}")
    return array.transpose([axes.index("Y"), axes.index("X"), *bands])


def stack_channels(path: str | Path) -> int:
    """A stack file's number of bands, from its header where it has one (.npy)."""
    shape = (np.load(path, mmap_mode="r", allow_pickle=False).shape if str(path).lower().endswith(STACK_SUFFIX)
             else load_stack(path).shape)
    return shape[-1] if len(shape) == 3 else 1


def unit_tensor(array: np.ndarray) -> torch.Tensor:
    """Channels x height x width in 0..1: uint8 by 255, any other type by its own range."""
    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    else:
        values = np.nan_to_num(array.astype(np.float32))
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1)


def channels_of(image) -> np.ndarray:
    """An input as a height x width x channels array: a stack as it is, a PIL image's pixels."""
    array = np.asarray(image) if isinstance(image, Image.Image) else image
    return array[..., None] if array.ndim == 2 else array


def resized(tensor: torch.Tensor, img_size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(tensor[None], size=(img_size, img_size), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


def repeated(values, in_chans: int) -> torch.Tensor:
    """An RGB mean or std over N channels, as timm's adapt_input_conv repeats RGB filters."""
    return torch.tensor([float(values[n % 3]) for n in range(in_chans)]).view(-1, 1, 1)


class StackTransform:
    """The transform of a run with --in-chans other than 3 (see the module docstring)."""

    def __init__(self, in_chans: int, img_size: int, mean, std, hflip: float = 0.0):
        self.in_chans, self.img_size, self.hflip = in_chans, img_size, hflip
        self.mean, self.std = repeated(mean, in_chans), repeated(std, in_chans)

    def __call__(self, image) -> torch.Tensor:
        array = channels_of(image)
        if array.shape[-1] != self.in_chans:
            raise MlexpError(f"an input has {array.shape[-1]} channel(s) where --in-chans is {self.in_chans}: give "
                             f"every image as a {self.in_chans}-channel stack ({STACK_SUFFIX}), or train with "
                             f"--in-chans {array.shape[-1]}")
        tensor = resized(unit_tensor(array), self.img_size)
        if self.hflip and float(torch.rand(())) < self.hflip:  # torch's generator: seeded per loader worker
            tensor = tensor.flip(-1)
        return (tensor - self.mean) / self.std


class RgbOnly:
    """First step of a 3-channel run's transform: images pass as they are; a stack file is taken
    if it holds 3 channels (as 8-bit RGB), else it is refused in one line."""

    def __call__(self, image):
        if isinstance(image, Image.Image):
            return image
        array = channels_of(image)
        if array.shape[-1] != 3:
            raise MlexpError(f"an input is a stack of {array.shape[-1]} channel(s): train with --in-chans "
                             f"{array.shape[-1]}")
        return Image.fromarray(np.round(unit_tensor(array).permute(1, 2, 0).numpy() * 255).astype(np.uint8), "RGB")
