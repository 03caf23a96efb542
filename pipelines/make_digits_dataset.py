#!/usr/bin/env python
"""Write scikit-learn's handwritten digits (1,797 real 8×8 scans, shipped inside scikit-learn) as image folders.

    python pipelines/make_digits_dataset.py --output_dir digits --resolution 32

`OUTPUT_DIR/train/<digit>/*.png` and `OUTPUT_DIR/heldout/<digit>/*.png` (every `--holdout_every`-th image, never
used for training: the default model's tests train their independent classifier on it). Images are upsampled from
8×8 (16 grey levels) to `--resolution` with bicubic interpolation, white digit on black, saved as RGB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image


def digits_arrays():
    """(images (N, 8, 8) in [0, 1], labels (N,)) from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def heldout_mask(num_images: int, holdout_every: int) -> np.ndarray:
    return np.arange(num_images) % holdout_every == 0


def to_picture(image: np.ndarray, resolution: int) -> PIL.Image.Image:
    gray = PIL.Image.fromarray((image * 255).round().astype(np.uint8), mode="L")
    return gray.resize((resolution, resolution), PIL.Image.BICUBIC).convert("RGB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--holdout_every", type=int, default=5)
    args = parser.parse_args(argv)
    images, labels = digits_arrays()
    held = heldout_mask(len(images), args.holdout_every)
    for index, (image, label) in enumerate(zip(images, labels)):
        split = "heldout" if held[index] else "train"
        folder = Path(args.output_dir) / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        to_picture(image, args.resolution).save(folder / f"{index:04d}.png")
    print(f"wrote {int((~held).sum())} training and {int(held.sum())} held-out digits to {args.output_dir}")


if __name__ == "__main__":
    main()
