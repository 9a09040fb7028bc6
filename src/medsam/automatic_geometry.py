"""Grids, crops, region boxes and mask arithmetic of automatic mode (:mod:`medsam.automatic`).

Boxes ``[x0, y0, x1, y1]`` here are SAM's inclusive pixel corners unless a docstring says
otherwise; ``[x, y, w, h]`` is SAM's ``bbox`` (``x + w`` the last column). Box suppression is
written here (torchvision's ``batched_nms``, which the reference uses, does not load beside the
CPU build of torch this project pins); ranking ties keep the earlier candidate, as torchvision's
stable sort does. Connected components come from ``scipy.ndimage.label``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product
from typing import Literal

import numpy as np

__all__ = [
    "box_grid",
    "box_nms",
    "crop_boxes",
    "mask_box",
    "point_grid",
    "region_boxes",
    "remove_small_regions",
    "xywh",
    "xyxy",
]


def point_grid(n_per_side: int) -> np.ndarray:
    """(n^2, 2) points (x, y) in [0, 1]^2: cell centres of an n x n grid, row by row."""
    step = 1.0 / n_per_side
    side = np.linspace(step / 2, 1 - step / 2, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def box_grid(size: tuple[int, int], n_per_side: int, fractions: Sequence[float]) -> np.ndarray:
    """(K, 4) square boxes [x0, y0, x1, y1] centred on the grid points, one per size
    (``fraction`` of the shorter side), clipped to the image; sizes vary slowest."""
    height, width = size
    centres = point_grid(n_per_side) * np.array([width, height], dtype=np.float64)
    out = []
    for fraction in fractions:
        half = fraction * min(height, width) / 2
        boxes = np.concatenate([centres - half, centres + half], axis=1)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        out.append(boxes)
    return np.concatenate(out)


def region_boxes(image: np.ndarray, scales: Sequence[float], area: tuple[float, float]) -> np.ndarray:
    """(K, 4) boxes [x0, y0, x1, y1] (``x1`` one past the last column) around the regions of
    Felzenszwalb's graph segmentation (scikit-image) at each ``scale``; regions covering less
    than ``area[0]`` or more than ``area[1]`` of the image are skipped, duplicates removed."""
    from scipy import ndimage
    from skimage.segmentation import felzenszwalb

    picture = np.asarray(image)
    channel_axis = -1 if picture.ndim == 3 else None
    total = picture.shape[0] * picture.shape[1]
    found = []
    for scale in scales:
        regions = felzenszwalb(
            picture, scale=scale, sigma=0.8, min_size=max(4, int(area[0] * total)), channel_axis=channel_axis
        )
        count = int(regions.max()) + 1
        sizes = np.bincount(regions.ravel(), minlength=count)
        wanted = (sizes >= area[0] * total) & (sizes <= area[1] * total)
        # regions are numbered from 0; find_objects numbers them from 1
        for index, where in enumerate(ndimage.find_objects(regions + 1)):
            if where is not None and wanted[index]:
                rows, cols = where[0], where[1]
                found.append((int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)))
    unique = sorted(set(found), key=found.index)
    return np.asarray(unique, dtype=np.float64).reshape(-1, 4)


def crop_boxes(size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """``([x0, y0, x1, y1], layer)`` of the whole image and of each crop layer's tiles.

    Layer i (1-based) tiles the image with 2^i x 2^i crops overlapping by
    ``int(overlap_ratio * shorter_side * 2 / 2^i)`` pixels, listed column by column.
    """
    height, width = size
    shorter = min(height, width)
    out: list[tuple[list[int], int]] = [([0, 0, width, height], 0)]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * shorter * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + width) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + height) / n))
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            out.append(([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)], layer))
    return out


def mask_box(mask: np.ndarray) -> list[int]:
    """SAM's inclusive box ``[x0, y0, x1, y1]`` of a (H, W) mask; ``[0, 0, 0, 0]`` if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best score first.

    ``boxes`` (N, 4) [x0, y0, x1, y1]; a box is dropped when its IoU (area ``(x1 - x0) *
    (y1 - y0)``) with a kept, higher-ranked box exceeds ``iou_threshold``. Equal scores keep
    the input order. An IoU that is undefined (two boxes of zero area) suppresses nothing.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        w = (np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0])).clip(min=0)
        h = (np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1])).clip(min=0)
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def remove_small_regions(
    mask: np.ndarray, min_area: float, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill holes (``"holes"``) or drop islands (``"islands"``) under ``min_area`` pixels.

    Regions are 8-connected. A "hole" is any connected region of background, the outer one
    included; if every island is small, the largest stays. Returns ``(mask, changed)``.
    """
    from scipy import ndimage

    holes = mode == "holes"
    regions, count = ndimage.label(mask != holes, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(regions, small), True
    large = np.setdiff1d(np.arange(1, count + 1), small)
    if large.size == 0:
        large = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, large), True


def xyxy(bbox: list[int]) -> list[int]:
    """SAM's ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]`` (inclusive corners)."""
    return [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]


def xywh(box: list[int]) -> list[int]:
    """``[x0, y0, x1, y1]`` (inclusive corners) -> SAM's ``[x, y, w, h]``."""
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
