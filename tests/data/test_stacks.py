"""Stacks of bands (`--in-chans`): a TIFF reads the same whichever way it stores its bands, as
a .npy of the same array does; a 3-channel run reads a TIFF as a picture; a broken one is a
user error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from mlexp.data.stacks import StackTransform, is_stack, load_stack, stack_channels
from mlexp.errors import MlexpError


@pytest.fixture
def bands() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 65535, size=(12, 9, 5), dtype=np.uint16)  # height 12, width 9, 5 bands


def test_interleaved_planar_and_numpy_stacks_read_as_the_same_array(tmp_path, bands):
    tifffile.imwrite(tmp_path / "interleaved.tif", bands, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tiff", bands.transpose(2, 0, 1), photometric="minisblack",
                     planarconfig="separate")
    np.save(tmp_path / "array.npy", bands)
    for name in ("interleaved.tif", "planar.tiff", "array.npy"):
        assert np.array_equal(load_stack(tmp_path / name), bands), name
        assert stack_channels(tmp_path / name) == 5
    single = bands[..., 0]
    tifffile.imwrite(tmp_path / "depth.tif", single)  # one band (a depth map): height x width x 1
    assert load_stack(tmp_path / "depth.tif").shape == (12, 9, 1)
    # 16-bit bands are scaled by their own range, as for a .npy, into the run's input
    tensors = [StackTransform(5, 8, (0.5,) * 3, (0.25,) * 3)(load_stack(tmp_path / name))
               for name in ("interleaved.tif", "array.npy")]
    assert tensors[0].shape == (5, 8, 8) and torch.equal(tensors[0], tensors[1])


def test_a_three_channel_run_reads_a_tiff_as_a_picture_and_others_as_bands(tmp_path):
    assert not is_stack(tmp_path / "photo.tif", 3) and is_stack(tmp_path / "photo.tif", 4)
    assert is_stack(tmp_path / "photo.TIFF", 5) and is_stack(tmp_path / "stack.npy", 3)
    assert not is_stack(tmp_path / "photo.png", 5)


def test_a_broken_tiff_is_one_user_error_naming_the_file(tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not a tiff at all")
    with pytest.raises(MlexpError, match=r"broken\.tif: not a readable TIFF \(no image in it\)"):
        load_stack(broken)
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.zeros((2, 3, 8, 8), np.uint8), metadata={"axes": "ZCYX"}, imagej=True)
    with pytest.raises(MlexpError, match=r"volume\.tif: a TIFF stack is one image of bands"):
        load_stack(volume)
