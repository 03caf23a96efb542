"""Helpers for zero-shot editing masks (1 = keep the given image's tokens, 0 = let the model draw)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


def box_edit_mask(side: int, box: tuple[float, float, float, float], inpaint: bool = True) -> torch.Tensor:
    """
    A (side, side) keep-mask from a box given as fractions (y0, x0, y1, x1) of the image, rounded to the token grid as
    upstream's notebook does. In-painting regenerates the box (keeps the outside); out-painting keeps the box.
    """
    y0, x0, y1, x1 = box
    if not all(0.0 <= v <= 1.0 for v in box) or y1 <= y0 or x1 <= x0:
        raise ValueError(f"box must be fractions y0 < y1, x0 < x1 in [0, 1], got {box}")
    mask = torch.zeros(side, side)
    mask[round(y0 * side) : round(y1 * side), round(x0 * side) : round(x1 * side)] = 1
    return 1 - mask if inpaint else mask


def mask_from_pil(mask: PIL.Image.Image, keep_white: bool = True) -> torch.Tensor:
    """A keep-mask from a grayscale/RGB picture, values in [0, 1]; white keeps unless `keep_white=False`."""
    values = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    return values if keep_white else 1 - values


__all__ = ["box_edit_mask", "mask_from_pil"]
