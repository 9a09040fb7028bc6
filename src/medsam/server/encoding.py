"""Masks and slices on the wire: run-length encoding and PNG.

RLE (:func:`rle_encode`): a label array (any shape, values 0..65535) flattened in C order (row
by row: ``x`` fastest) as runs ``values[i]`` repeated ``counts[i]`` times. A binary mask is the
special case with values 0/1. The page decodes it into a ``Uint8Array`` in a few lines.
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["png_bytes", "rle_decode", "rle_encode"]


def rle_encode(array: np.ndarray) -> tuple[list[int], list[int]]:
    """``(values, counts)`` of the C-order runs of an integer array."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0:
        return [], []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    counts = np.diff(np.concatenate((starts, [flat.size])))
    return flat[starts].astype(np.int64).tolist(), counts.astype(np.int64).tolist()


def rle_decode(values, counts, shape, dtype=np.uint8) -> np.ndarray:
    """Inverse of :func:`rle_encode`; raises ValueError for anything that is not a valid run list.

    Checked before any array of the target size is made: ``shape`` has non-negative sizes,
    ``values`` and ``counts`` are equally long lists of integers, every value fits ``dtype``,
    every count is ``>= 0`` and the counts add up to exactly the number of elements of ``shape``
    (summed without fixed-width wrap-around, so huge counts cannot pass as a small total).
    """
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError("RLE shape must be a list of integers") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"RLE shape must have sizes >= 0, got {list(dims)}")
    n = math.prod(dims)
    if len(values) != len(counts):
        raise ValueError("RLE values and counts must be lists of the same length")
    info = np.iinfo(dtype)
    try:
        v = np.asarray(values, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        raise ValueError(f"RLE values must lie in {info.min}..{info.max} and counts in 0..{n}") from None
    if v.ndim != 1 or c.ndim != 1:
        raise ValueError("RLE values and counts must be flat lists of integers")
    if v.size and (v.min() < info.min or v.max() > info.max):
        raise ValueError(f"RLE values must lie in {info.min}..{info.max}")
    if c.size and (c.min() < 0 or c.max() > n):
        raise ValueError(f"RLE counts must lie in 0..{n} (shape {list(dims)})")
    # Each count is now <= n, so a float64 total cannot wrap; it bounds the exact integer sum.
    if float(c.sum(dtype=np.float64)) > n + 0.5 or int(c.sum()) != n:
        raise ValueError(f"RLE counts must add up to {n} (shape {list(dims)})")
    return np.repeat(v.astype(dtype), c).reshape(dims)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an (H, W) uint8/uint16 or (H, W, 3|4) uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
