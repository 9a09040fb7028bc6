"""Labels of a case on their way into the corpus: aligned to the image's voxel grid, then cleaned.

:func:`align_label` puts a label volume on its image's grid (exactly, or with flipped / permuted
axes when ``label_alignment: reorient``); :func:`curate_labels` keeps or drops label ids, removes
3D and then per-slice 2D connected components below the dataset's size limits, and optionally
splits a label into instances (MedSAM-1M's recipe, LiteMedSAM's limits as defaults elsewhere).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ..io import MedicalImage, check_same_geometry

__all__ = ["align_label", "curate_labels"]


# --------------------------------------------------------------------------- geometry
def align_label(image: MedicalImage, label: MedicalImage, mode: str = "strict") -> tuple[np.ndarray, str]:
    """The label array on the image's voxel grid, and how it got there.

    ``mode="strict"``: the geometries must match (:func:`check_same_geometry`),
    else ``ValueError``. ``mode="reorient"``: a label whose voxel centres are
    exactly the image's, stored with flipped and/or permuted index axes (e.g.
    a NIfTI written from a DICOM series with the row axis reversed), is
    flipped/transposed onto the image grid; anything else is still refused.
    Returns ``(array, "identity" | "reoriented")``.
    """
    if label.is_color:
        raise ValueError(f"label {label.source_path} is a colour image; labels must be one integer channel")
    try:
        check_same_geometry(image, label)
        return label.array, "identity"
    except ValueError as exc:
        if mode != "reorient":
            raise
        strict_error = exc
    g = image.geometry_ndim
    if label.geometry_ndim != g or image.ndim_spatial != g or label.ndim_spatial != g:
        raise strict_error
    a_img = image.direction @ np.diag(image.spacing)
    a_lab = label.direction @ np.diag(label.spacing)
    inv = np.linalg.inv(a_lab)
    m = inv @ a_img
    t = inv @ (np.asarray(image.origin) - np.asarray(label.origin))
    r = np.rint(m)
    is_perm = np.allclose(m, r, atol=1e-3) and np.all(np.abs(r).sum(axis=0) == 1) and np.all(np.abs(r).sum(axis=1) == 1)
    if not is_perm or not np.allclose(t, np.rint(t), atol=1e-3):
        raise ValueError(f"{strict_error}; and the label grid is not a flip/permutation of the image grid")
    t = np.rint(t).astype(int)
    size_i, size_l = image.size_xyz, label.size_xyz
    perm = [int(np.argmax(np.abs(r[:, d]))) for d in range(g)]
    sign = [int(r[perm[d], d]) for d in range(g)]
    for d in range(g):
        n = size_i[d]
        if size_l[perm[d]] != n or t[perm[d]] != (0 if sign[d] > 0 else n - 1):
            raise ValueError(f"{strict_error}; and the label grid does not cover the image grid exactly")
    la = label.array.T  # (i, j[, k]) index order
    out = np.transpose(la, perm)
    for d in range(g):
        if sign[d] < 0:
            out = np.flip(out, axis=d)
    return np.ascontiguousarray(out.T), "reoriented"


# --------------------------------------------------------------------------- labels
def _as_label_array(lab: np.ndarray, extra_ids: int = 0) -> np.ndarray:
    """A writable unsigned copy of ``lab`` (uint8 when it fits, else uint16)."""
    lab = np.asarray(lab)
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.number) or np.issubdtype(lab.dtype, np.complexfloating):
        raise ValueError(f"label array has dtype {lab.dtype}; need integers")
    if np.issubdtype(lab.dtype, np.floating) and (not np.all(np.isfinite(lab)) or not np.all(lab == np.rint(lab))):
        raise ValueError("label array holds non-integer values; labels must be integer ids")
    lo = lab.min() if lab.size else 0
    hi = int(lab.max()) if lab.size else 0
    if lo < 0:
        raise ValueError(f"label array holds negative ids (minimum {lo})")
    if hi > np.iinfo(np.uint16).max:
        raise ValueError(f"label id {hi} is above 65535; the corpus stores labels as uint8/uint16")
    dtype = np.uint8 if hi + extra_ids <= 255 else np.uint16
    return lab.astype(dtype, copy=True)


def _remove_small(sub: np.ndarray, lid: int, min_size: int, structure: np.ndarray) -> tuple[int, int]:
    """Set components of ``lid`` smaller than ``min_size`` in ``sub`` (a view) to 0; (count, voxels)."""
    m = sub == lid
    cc, n = ndimage.label(m, structure=structure)
    if n == 0:
        return 0, 0
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    small = np.flatnonzero(sizes < min_size)
    small = small[small > 0]
    if small.size == 0:
        return 0, 0
    sub[np.isin(cc, small)] = 0
    return int(small.size), int(sizes[small].sum())


def curate_labels(
    lab: np.ndarray,
    *,
    keep_labels: Sequence[int] | None = None,
    drop_labels: Sequence[int] = (),
    min_component_3d: int = 1000,
    min_component_2d: int = 100,
    instance_labels: Sequence[int] = (),
    names: dict[int, str] | None = None,
    slice_axis: int = 0,
) -> tuple[np.ndarray, dict[int, str], dict[str, Any]]:
    """MedSAM's label clean-up on a ``(Z, Y, X)`` volume (or one ``(H, W)`` image).

    Order: keep/drop ids; per label, remove 3D components (26-connectivity)
    below ``min_component_3d`` voxels (volumes only); per slice along
    ``slice_axis`` and per label, remove 2D components (8-connectivity) below
    ``min_component_2d`` pixels; split each id of ``instance_labels`` into its
    connected components, relabelled with new ids above every existing id and
    named ``<name>_<n>`` (n = 1, 2, ... in scan order).

    Returns ``(labels, names, stats)``: a new uint8/uint16 array, the names of
    the ids left in it, and what was removed.
    """
    names = dict(names or {})
    volume = lab.ndim == 3
    work = _as_label_array(lab, extra_ids=0 if not instance_labels else 256)
    stats: dict[str, Any] = {"dropped": {}, "removed_3d": {}, "removed_2d": {}, "instances": {}}

    counts = np.bincount(work.ravel())
    present = [int(i) for i in np.flatnonzero(counts) if i > 0]
    keep = None if keep_labels is None else {int(i) for i in keep_labels}
    drop = {int(i) for i in drop_labels}
    zero = [i for i in present if (keep is not None and i not in keep) or i in drop]
    if zero:
        work[np.isin(work, zero)] = 0
        stats["dropped"] = {str(i): int(counts[i]) for i in zero}

    if volume and min_component_3d > 1:
        struct3 = np.ones((3, 3, 3), dtype=bool)
        for lid, bb in enumerate(ndimage.find_objects(work), start=1):
            if bb is None:
                continue
            n, vox = _remove_small(work[bb], lid, min_component_3d, struct3)
            if n:
                stats["removed_3d"][str(lid)] = [n, vox]

    stack = np.moveaxis(work, slice_axis, 0) if volume else work[None]
    if min_component_2d > 1:
        struct2 = np.ones((3, 3), dtype=bool)
        removed2: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for s in np.flatnonzero(np.any(stack, axis=(1, 2))):
            sl = stack[s]
            for lid, bb in enumerate(ndimage.find_objects(sl), start=1):
                if bb is None:
                    continue
                n, vox = _remove_small(sl[bb], lid, min_component_2d, struct2)
                if n:
                    removed2[lid][0] += n
                    removed2[lid][1] += vox
        stats["removed_2d"] = {str(k): v for k, v in sorted(removed2.items())}

    if instance_labels:
        top = max([int(work.max())] + list(names))
        next_id = top + 1
        struct = np.ones((3,) * work.ndim, dtype=bool)
        for lid in sorted({int(i) for i in instance_labels}):
            m = work == lid
            if not m.any():
                continue
            cc, n = ndimage.label(m, structure=struct)
            if next_id + n - 1 > np.iinfo(np.uint16).max:
                raise ValueError(f"instance split of label {lid} needs ids above 65535")
            if next_id + n - 1 > np.iinfo(work.dtype).max:
                work = work.astype(np.uint16)
                m = work == lid
            work[m] = (cc[m] + (next_id - 1)).astype(work.dtype)
            base = names.pop(lid, f"label_{lid}")
            for k in range(1, n + 1):
                names[next_id + k - 1] = f"{base}_{k}"
            stats["instances"][str(lid)] = list(range(next_id, next_id + n))
            next_id += n

    final = np.bincount(work.ravel())
    left = [int(i) for i in np.flatnonzero(final) if i > 0]
    out_dtype = np.uint8 if (not left or max(left) <= 255) else np.uint16
    if work.dtype != out_dtype:
        work = work.astype(out_dtype)
    out_names = {i: names.get(i, f"label_{i}") for i in left}
    stats["voxels"] = {str(i): int(final[i]) for i in left}
    return work, out_names, stats
