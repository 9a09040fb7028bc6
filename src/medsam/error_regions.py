"""Where a prediction is wrong: the error region that corrective clicks and scribbles go in, and
random error points for simulated clicks in training."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def deepest_error(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, tuple[int, int], bool] | None:
    """The error region of an (H, W) bool prediction against the (H, W) bool ground truth that
    holds the pixel deepest inside an error (Euclidean distance transform, the image border
    counting as outside; the missed region ``gt & ~pred`` wins ties): (region, (y, x) of that
    pixel, True for missed / False for false); None when the prediction is perfect."""
    best = None
    for region, missed in ((gt & ~pred, True), (pred & ~gt, False)):
        if not region.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        if best is None or depth[y, x] > best[0]:
            best = (depth[y, x], region, (int(y), int(x)), missed)
    return None if best is None else best[1:]


def random_error_point(prediction: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A random pixel (voxel) of the error of a bool ``prediction`` against the bool ``target``
    of the same shape, as its index array, with label 1 where the object is missed and 0 where
    the prediction overflows it; a random pixel inside the object (label 1) when there is no error."""
    missed = target & ~prediction
    errors = np.argwhere(missed | (prediction & ~target))
    if len(errors) == 0:
        inside = np.argwhere(target)
        return inside[rng.integers(len(inside))], 1
    voxel = errors[rng.integers(len(errors))]
    return voxel, int(missed[tuple(voxel)])
