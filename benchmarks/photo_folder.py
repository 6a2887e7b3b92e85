"""A real image folder of JPEG photos, made offline from scikit-image's sample images.

Ten classes, one per photo (astronaut, coffee, cat, rocket, galaxies, tissue stain, retina;
brick, grass and gravel textures, which are greyscale). Each image is a random square crop
(15-35% of the photo's short side), resized to `size` px, maybe flipped, saved as a JPEG of
random quality. Training crops come from the left 70% of each photo and validation crops
from the right 30%, so validation shows parts of the scene never trained on.

    python benchmarks/photo_folder.py /tmp/photos            # 40 train + 10 val per class
    python benchmarks/photo_folder.py /tmp/photos --train 80 --val 20 --size 192

Needs scikit-image (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "brick", "grass", "gravel")
TRAIN_WIDTH = 0.7  # training crops from the left 70% of each photo, validation from the rest


def make_photo_folder(root: Path, train: int = 40, val: int = 10, size: int = 160, seed: int = 0) -> Path:
    """ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg; returns ROOT. Same seed, same files."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        height, width = photo.shape[:2]
        split = int(width * TRAIN_WIDTH)
        for part, count, (left, right) in (("train", train, (0, split)), ("val", val, (split, width))):
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                side = int(rng.uniform(0.15, 0.35) * min(height, right - left))
                top = int(rng.integers(0, height - side + 1))
                start = int(rng.integers(left, right - side + 1))
                crop = Image.fromarray(photo[top:top + side, start:start + side, :3]).resize((size, size), Image.BICUBIC)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{index:04d}.jpg", quality=int(rng.integers(75, 96)))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=40, help="training images per class")
    parser.add_argument("--val", type=int, default=10, help="validation images per class")
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    make_photo_folder(args.root, args.train, args.val, args.size)
    print(f"{args.root}: {len(PHOTOS)} classes, {args.train} train + {args.val} val JPEGs each")


if __name__ == "__main__":
    main()
