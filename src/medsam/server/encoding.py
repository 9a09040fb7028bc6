"""Masks and slices on the wire: run-length encoding, PNG, display windows.

RLE (:func:`rle_encode`): a label array (any shape, values 0..65535) flattened in C order (row
by row: ``x`` fastest) as runs ``values[i]`` repeated ``counts[i]`` times. A binary mask is the
special case with values 0/1. The page decodes it into a ``Uint8Array`` in a few lines.

Display windows (:func:`window_to_uint8`): ``auto`` shows exactly what the model sees (the
datastore's model input); a CT preset name (``soft_tissue``, ``lung``, ``brain``, ``bone``,
``liver``; :data:`medsam.curate.normalize.CT_WINDOWS`) or an explicit level/width clips the raw
values (Hounsfield units for CT) to ``[level - width/2, level + width/2]`` and maps that to 0..255.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["rle_encode", "rle_decode", "png_bytes", "window_to_uint8", "window_presets"]


def rle_encode(array: np.ndarray) -> tuple[list[int], list[int]]:
    """``(values, counts)`` of the C-order runs of an integer array."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0:
        return [], []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    counts = np.diff(np.concatenate((starts, [flat.size])))
    return flat[starts].astype(np.int64).tolist(), counts.astype(np.int64).tolist()


def rle_decode(values: list[int], counts: list[int], shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
    """Inverse of :func:`rle_encode`; raises ValueError when the runs do not fill ``shape``."""
    v = np.asarray(values, dtype=np.int64)
    c = np.asarray(counts, dtype=np.int64)
    n = int(np.prod(shape))
    if v.shape != c.shape or v.ndim != 1:
        raise ValueError("RLE values and counts must be lists of the same length")
    if (c < 0).any() or int(c.sum()) != n:
        raise ValueError(f"RLE counts must be >= 0 and add up to {n} (shape {tuple(shape)}), got {int(c.sum())}")
    info = np.iinfo(dtype)
    if v.size and (v.min() < info.min or v.max() > info.max):
        raise ValueError(f"RLE values must lie in {info.min}..{info.max}")
    return np.repeat(v, c).astype(dtype).reshape(shape)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an (H, W) uint8/uint16 or (H, W, 3|4) uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def window_presets() -> dict[str, tuple[float, float]]:
    """CT window presets, name -> (level, width) in HU."""
    from ..curate.normalize import CT_WINDOWS

    return dict(CT_WINDOWS)


def window_to_uint8(raw: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip ``raw`` to ``[level - width/2, level + width/2]`` and map it to 0..255 (uint8)."""
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"a window needs a finite level and a width > 0, got ({level}, {width})")
    lo = level - width / 2.0
    out = (np.asarray(raw, dtype=np.float32) - lo) * (255.0 / width)
    return np.clip(np.nan_to_num(out), 0, 255).astype(np.uint8)
