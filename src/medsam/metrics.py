"""Segmentation metrics of the field: Dice (DSC), normalized surface Dice (NSD) and HD95.

Axis and spacing convention
---------------------------
Masks are numpy arrays of any shape; a 3D volume is ``(D, H, W)`` = ``(z, y, x)``
(the order ``SimpleITK.GetArrayFromImage`` returns) and a 2D image is
``(H, W)`` = ``(y, x)``. ``spacing`` is the physical size of a voxel in mm **in the
same axis order as the array axes**: ``(z, y, x)`` for a ``(D, H, W)`` volume.
SimpleITK's ``GetSpacing()`` is ``(x, y, z)`` and must be reversed before it is
passed here (passing it unreversed is a known bug of the MedSAM release's
evaluation scripts).

Binary masks: any dtype; non-zero is foreground.

Conventions for empty masks (never NaN):

================  =====  =====  ======
case              DSC    NSD    HD95
================  =====  =====  ======
both empty        1.0    1.0    0.0
exactly one empty 0.0    0.0    inf
================  =====  =====  ======

NSD is always computed (the MedSAM release skipped it, reporting 0, whenever the
DSC was below 0.2).

Surface formulation and the choice of implementation
----------------------------------------------------
NSD and HD95 follow DeepMind's ``surface-distance`` package (Nikolov et al. 2018,
https://github.com/google-deepmind/surface-distance): the surface is placed on the
grid of voxel corners (shifted by half a voxel); each corner whose 2x2 (2D) or
2x2x2 (3D) neighbourhood is mixed is a surface element ("surfel") whose length
(2D) or area (3D, from the marching-cubes triangles) is computed with the
spacing; distances are Euclidean distance transforms in mm on that grid. NSD at
tolerance ``t`` is the surfel area of both surfaces lying within ``t`` of the
other, over the total surfel area; HD95 is the maximum over both directions of
the area-weighted 95th percentile of the surface distances.

We do **not** depend on ``surface-distance`` at run time, and re-implement it here
(about 100 lines, on scipy.ndimage), because:

* its only PyPI release (0.1) fails under numpy 2: ``np.Inf`` / ``np.NaN`` were
  removed and it raises ``AttributeError`` as soon as one mask is empty; upstream
  fixed this on GitHub in 2025 but never published a release;
* it calls ``scipy.ndimage.filters`` / ``scipy.ndimage.morphology``, namespaces
  deprecated and to be removed in SciPy 2.0;
* it sorts surfels with a Python ``sorted(zip(...))``, slow on CT volumes with
  millions of surfels (we use ``np.lexsort``, which gives the same order).

MONAI was not chosen either: a heavy dependency (not otherwise needed) for three
functions, whose HD95 takes an unweighted percentile over boundary voxels and
whose surface Dice matches this formulation only with ``use_subvoxels=True``.

The 3D surfel-area lookup table is not copied: it is derived from scikit-image's
classic (Lorensen) marching cubes, run on each 2x2x2 configuration with at most 4
foreground corners and on the complement of the others; this reproduces
DeepMind's 256-entry table exactly (checked in ``tests/test_metrics.py`` for every
code and several anisotropic spacings). The tests use the ``surface-distance``
package itself (with a numpy-2 shim applied in the test only) as the oracle for
every quantity computed here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "dice_score",
    "hausdorff_distance_95",
    "label_scores",
    "normalized_surface_dice",
]

# Neighbourhood codes, as in DeepMind's package: correlating the (cropped, padded)
# mask with these kernels gives, at each voxel corner, the bit pattern of its
# 2x2 (2D) / 2x2x2 (3D) neighbourhood.
_KERNEL_2D = np.array([[8, 4], [2, 1]])
_KERNEL_3D = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


# --------------------------------------------------------------------------- validation


def _as_mask(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:
        raise ValueError(f"{name} must be a numeric or boolean array, got dtype object")
    if a.ndim == 0:
        raise ValueError(f"{name} must have at least one axis, got a scalar")
    return a if a.dtype == bool else a != 0


def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: pred {p.shape} vs gt {g.shape}")
    return p, g


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"spacing must be a sequence of {ndim} positive numbers, got {spacing!r}") from e
    if np.ndim(spacing) != 1 or len(sp) != ndim:
        raise ValueError(
            f"spacing must have one entry per array axis ({ndim}, in array axis order, "
            f"e.g. (z, y, x) mm for a (D, H, W) volume), got {spacing!r}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing entries must be finite and > 0, got {spacing!r}")
    return sp


def _check_surface_ndim(ndim: int) -> None:
    if ndim not in (2, 3):
        raise ValueError(f"surface metrics (NSD, HD95) need 2D or 3D masks, got {ndim}D")


def _check_tolerance(tolerance_mm) -> float:
    t = float(tolerance_mm)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm!r}")
    return t


# --------------------------------------------------------------------------- surfel areas


def _contour_length_table_2d(spacing: Sequence[float]) -> np.ndarray:
    """Length in mm of the marching-squares contour for each of the 16 codes.

    Bits of the code: 8 top-left, 4 top-right, 2 bottom-left, 1 bottom-right;
    axis 0 runs down (spacing[0]), axis 1 runs right (spacing[1]).
    """
    vertical, horizontal = float(spacing[0]), float(spacing[1])
    diag = 0.5 * math.hypot(vertical, horizontal)
    table = np.zeros(16)
    for code in (0b0001, 0b0010, 0b0100, 0b1000, 0b0111, 0b1011, 0b1101, 0b1110):
        table[code] = diag  # one corner in (or out): a cut across that corner
    table[0b0011] = table[0b1100] = horizontal  # a horizontal line across the cell
    table[0b0101] = table[0b1010] = vertical  # a vertical line across the cell
    table[0b0110] = table[0b1001] = 2 * diag  # the two saddle cases
    return table


@functools.lru_cache(maxsize=1)
def _unit_triangle_normals_3d() -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted normals of the marching-cubes triangles of every 3D code.

    Returns ``(normals, codes)``: ``normals`` is ``(T, 3)`` (half the cross product
    of two edges, so its norm is the triangle's area at unit spacing, one component
    per array axis) and ``codes`` is ``(T,)``, the neighbourhood code each triangle
    belongs to. Configurations with more than 4 foreground corners use the
    triangulation of their complement, as DeepMind's table does.
    """
    from skimage import measure  # a project dependency; imported lazily (slow import)

    normals, codes = [], []
    for code in range(1, 255):
        c = code if bin(code).count("1") <= 4 else 255 - code
        cube = ((c & _KERNEL_3D) != 0).astype(np.float64)
        verts, faces, _, _ = measure.marching_cubes(cube, level=0.5, method="lorensen")
        tri = verts[faces]  # (F, 3 vertices, 3 coords)
        n = 0.5 * np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normals.append(n)
        codes.append(np.full(len(n), code))
    return np.concatenate(normals), np.concatenate(codes)


def _surface_area_table_3d(spacing: Sequence[float]) -> np.ndarray:
    """Surfel area in mm^2 for each of the 256 2x2x2 neighbourhood codes."""
    s0, s1, s2 = (float(s) for s in spacing)
    normals, codes = _unit_triangle_normals_3d()
    # An affine scaling diag(s) maps an area-normal n to (n0*s1*s2, n1*s0*s2, n2*s0*s1).
    scaled = normals * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.bincount(codes, weights=np.linalg.norm(scaled, axis=1), minlength=256)


# --------------------------------------------------------------------------- distances


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surface distances of two non-empty boolean masks (DeepMind's formulation).

    Returns ``(dist_gt_to_pred, area_gt, dist_pred_to_gt, area_pred)``: 1D float
    arrays, for every surfel of gt (resp. pred) the distance in mm to the other
    surface and the surfel's length (2D, mm) or area (3D, mm^2), sorted by
    (distance, area). Identical to ``surface_distance.compute_surface_distances``.
    """
    ndim = gt.ndim
    if ndim == 2:
        table, kernel, full = _contour_length_table_2d(spacing), _KERNEL_2D, 0b1111
    else:
        table, kernel, full = _surface_area_table_3d(spacing), _KERNEL_3D, 0b11111111

    # Crop to the bounding box of both masks, with one zero voxel of padding after
    # the box on each axis (the correlation's constant mode pads before it).
    union = pred | gt
    box = []
    for axis in range(ndim):
        idx = np.flatnonzero(union.any(axis=tuple(a for a in range(ndim) if a != axis)))
        box.append(slice(idx[0], idx[-1] + 1))
    box = tuple(box)
    pad = [(0, 1)] * ndim

    distmaps, borders, areas = [], [], []
    for mask in (gt, pred):
        crop = np.pad(mask[box].astype(np.uint8), pad)
        code = ndimage.correlate(crop, kernel, mode="constant", cval=0)
        border = (code != 0) & (code != full)
        borders.append(border)
        areas.append(table[code[border]])
        distmaps.append(ndimage.distance_transform_edt(~border, sampling=spacing))
    (border_gt, border_pred), (area_gt, area_pred) = borders, areas
    dist_gt_to_pred = distmaps[1][border_gt]
    dist_pred_to_gt = distmaps[0][border_pred]

    order = np.lexsort((area_gt, dist_gt_to_pred))
    dist_gt_to_pred, area_gt = dist_gt_to_pred[order], area_gt[order]
    order = np.lexsort((area_pred, dist_pred_to_gt))
    dist_pred_to_gt, area_pred = dist_pred_to_gt[order], area_pred[order]
    return dist_gt_to_pred, area_gt, dist_pred_to_gt, area_pred


def _nsd_from_distances(d_gt, a_gt, d_pred, a_pred, tolerance_mm: float) -> float:
    overlap = np.sum(a_gt[d_gt <= tolerance_mm]) + np.sum(a_pred[d_pred <= tolerance_mm])
    return float(overlap / (np.sum(a_gt) + np.sum(a_pred)))


def _percentile_distance(d: np.ndarray, a: np.ndarray, percent: float) -> float:
    cum = np.cumsum(a) / np.sum(a)
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(d[min(idx, len(d) - 1)])


def _hd_from_distances(d_gt, a_gt, d_pred, a_pred, percent: float = 95.0) -> float:
    return max(_percentile_distance(d_gt, a_gt, percent), _percentile_distance(d_pred, a_pred, percent))


# --------------------------------------------------------------------------- public API


def dice_score(pred, gt) -> float:
    """Dice similarity coefficient ``2|P & G| / (|P| + |G|)`` of two binary masks.

    Args:
        pred, gt: arrays of the same shape, any number of axes; non-zero is foreground.

    Returns:
        DSC in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.

    Raises:
        ValueError: if the shapes differ or an input is a scalar.
    """
    p, g = _check_pair(pred, gt)
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    if n_p + n_g == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / (n_p + n_g)


def normalized_surface_dice(pred, gt, spacing, tolerance_mm: float = 2.0) -> float:
    """Normalized surface Dice (NSD) at ``tolerance_mm``, DeepMind's surfel formulation.

    Args:
        pred, gt: 2D ``(H, W)`` or 3D ``(D, H, W)`` masks of the same shape;
            non-zero is foreground.
        spacing: voxel size in mm, one entry per array axis in array order
            (``(z, y, x)`` for a ``(D, H, W)`` volume, i.e. SimpleITK's
            ``GetSpacing()`` reversed).
        tolerance_mm: surfels within this distance (inclusive) of the other
            surface count as overlapping.

    Returns:
        NSD in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
        Computed whatever the DSC.

    Raises:
        ValueError: shapes differ, masks not 2D/3D, spacing of the wrong length or
            not positive, or negative tolerance.
    """
    p, g = _check_pair(pred, gt)
    _check_surface_ndim(g.ndim)
    sp = _check_spacing(spacing, g.ndim)
    tol = _check_tolerance(tolerance_mm)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 1.0
    if not (has_p and has_g):
        return 0.0
    return _nsd_from_distances(*_surface_distances(p, g, sp), tol)


def hausdorff_distance_95(pred, gt, spacing) -> float:
    """Robust (95th percentile) Hausdorff distance in mm, DeepMind's formulation.

    The maximum over both directions (gt to pred, pred to gt) of the 95th
    percentile of the surfel distances to the other surface, weighted by surfel
    length (2D) or area (3D), as ``surface_distance.compute_robust_hausdorff``.

    Args:
        pred, gt: 2D ``(H, W)`` or 3D ``(D, H, W)`` masks of the same shape;
            non-zero is foreground.
        spacing: voxel size in mm, one entry per array axis in array order
            (``(z, y, x)`` for a ``(D, H, W)`` volume).

    Returns:
        HD95 in mm; 0.0 when both masks are empty, ``inf`` when exactly one is.

    Raises:
        ValueError: as :func:`normalized_surface_dice`.
    """
    p, g = _check_pair(pred, gt)
    _check_surface_ndim(g.ndim)
    sp = _check_spacing(spacing, g.ndim)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if not (has_p and has_g):
        return math.inf
    return _hd_from_distances(*_surface_distances(p, g, sp))


def _binary_scores(p: np.ndarray, g: np.ndarray, sp: tuple[float, ...], tol: float) -> dict:
    """DSC, NSD and HD95 of two validated boolean masks, sharing one distance computation."""
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    out = {"gt_voxels": n_g, "pred_voxels": n_p}
    if n_p == 0 and n_g == 0:
        return {**out, "dsc": 1.0, "nsd": 1.0, "hd95": 0.0}
    if n_p == 0 or n_g == 0:
        return {**out, "dsc": 0.0, "nsd": 0.0, "hd95": math.inf}
    dsc = 2.0 * int(np.count_nonzero(p & g)) / (n_p + n_g)
    dist = _surface_distances(p, g, sp)
    return {**out, "dsc": dsc, "nsd": _nsd_from_distances(*dist, tol), "hd95": _hd_from_distances(*dist)}


def _as_label_map(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name} must be an integer label map; got non-integral values ({a.dtype})")
        return a.astype(np.int64)
    raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")


def label_scores(
    pred_labels,
    gt_labels,
    spacing,
    labels: Iterable[int] | None = None,
    tolerance_mm: float = 2.0,
) -> list[dict]:
    """DSC, NSD and HD95 of each label of two integer label maps.

    Args:
        pred_labels, gt_labels: integer label maps of the same 2D ``(H, W)`` or 3D
            ``(D, H, W)`` shape (0 is background; floats are accepted if their
            values are integral; booleans count as label 1).
        spacing: voxel size in mm in array axis order (``(z, y, x)`` for 3D).
        labels: labels to score; default: the sorted union of the non-zero labels
            present in either map. A requested label absent from both maps scores
            as two empty masks (DSC 1, NSD 1, HD95 0).
        tolerance_mm: NSD tolerance.

    Returns:
        One dict per label, in label order, with keys ``label`` (int), ``dsc``,
        ``nsd``, ``hd95`` (float; see the module's empty-mask conventions),
        ``gt_voxels`` and ``pred_voxels`` (int).

    Raises:
        ValueError: shapes differ, non-integer labels, not 2D/3D, bad spacing or
            tolerance.
    """
    p = _as_label_map(pred_labels, "pred_labels")
    g = _as_label_map(gt_labels, "gt_labels")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: pred {p.shape} vs gt {g.shape}")
    _check_surface_ndim(g.ndim)
    sp = _check_spacing(spacing, g.ndim)
    tol = _check_tolerance(tolerance_mm)
    if labels is None:
        found = np.union1d(np.unique(p), np.unique(g))
        label_list = [int(v) for v in found if v != 0]
    else:
        label_list = [int(v) for v in labels]
    rows = []
    for lab in label_list:
        rows.append({"label": lab, **_binary_scores(p == lab, g == lab, sp, tol)})
    return [{k: r[k] for k in ("label", "dsc", "nsd", "hd95", "gt_voxels", "pred_voxels")} for r in rows]
