"""Tests of medsam.metrics against DeepMind's surface-distance package as the oracle.

surface-distance 0.1 (its only PyPI release) uses ``np.Inf`` / ``np.NaN``, removed in
numpy 2; the ``_numpy2_shim`` fixture restores those two aliases for the duration of
each test only. Its ``scipy.ndimage.filters`` calls warn (deprecated namespace), so
DeprecationWarnings are ignored in this module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medsam.metrics import dice_score, hausdorff_distance_95, label_scores, normalized_surface_dice

sd = pytest.importorskip("surface_distance")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _numpy2_shim(monkeypatch):
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)
    monkeypatch.setattr(np, "NaN", np.nan, raising=False)


def _oracle(pred, gt, spacing, tolerances):
    """(dsc, {tol: nsd}, hd95) by the surface-distance package."""
    d = sd.compute_surface_distances(gt.astype(bool), pred.astype(bool), list(spacing))
    nsd = {t: sd.compute_surface_dice_at_tolerance(d, t) for t in tolerances}
    return sd.compute_dice_coefficient(gt.astype(bool), pred.astype(bool)), nsd, sd.compute_robust_hausdorff(d, 95)


def _blobs(rng, shape, p=0.55, smooth=1):
    """Random blobby mask: thresholded noise, opened to make irregular surfaces."""
    m = ndimage.uniform_filter(rng.random(shape), size=3) > p
    return ndimage.binary_opening(m, iterations=smooth)


def _ellipsoid(shape, center, radii):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    r = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grids, center, radii))
    return r <= 1.0


TOLS = (0.0, 0.5, 1.0, 2.0, 3.7)


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize(
    "shape,spacing",
    [
        ((14, 32, 30), (2.5, 0.7, 0.9)),
        ((10, 24, 26), (1.0, 1.0, 1.0)),
        ((9, 20, 22), (0.4, 1.6, 3.0)),
        ((48, 45), (0.8, 1.3)),
        ((40, 40), (1.0, 1.0)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_oracle(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    gt, pred = _blobs(rng, shape), _blobs(rng, shape)
    assert gt.any() and pred.any()
    dsc, nsd, hd = _oracle(pred, gt, spacing, TOLS)
    assert dice_score(pred, gt) == pytest.approx(dsc, abs=1e-12)
    for t in TOLS:
        assert normalized_surface_dice(pred, gt, spacing, tolerance_mm=t) == pytest.approx(nsd[t], abs=1e-12)
    assert hausdorff_distance_95(pred, gt, spacing) == pytest.approx(hd, abs=1e-9)


def test_shaped_anisotropic_3d_match_oracle():
    spacing = (2.5, 0.7, 0.9)
    shape = (20, 48, 44)
    gt = _ellipsoid(shape, (10, 24, 22), (6, 15, 12))
    pred = _ellipsoid(shape, (11, 22, 23), (5, 17, 11))
    pred[12:14, 10:20, 15:30] = True  # a slab sticking out: a heavy distance tail
    dsc, nsd, hd = _oracle(pred, gt, spacing, TOLS)
    assert 0.5 < dsc < 1.0
    assert dice_score(pred, gt) == pytest.approx(dsc, abs=1e-12)
    for t in TOLS:
        assert normalized_surface_dice(pred, gt, spacing, t) == pytest.approx(nsd[t], abs=1e-12)
    assert hausdorff_distance_95(pred, gt, spacing) == pytest.approx(hd, abs=1e-9)
    # The spacing is in array axis order: swapping it changes the answer.
    assert hausdorff_distance_95(pred, gt, spacing[::-1]) != pytest.approx(hd)


def test_shaped_2d_and_masks_touching_the_border_match_oracle():
    spacing = (0.6, 1.1)
    shape = (40, 36)
    gt = _ellipsoid(shape, (0, 18), (12, 10))  # cut by the top border
    pred = _ellipsoid(shape, (3, 20), (12, 9))
    pred[:, 35] = True  # a line along the right border
    dsc, nsd, hd = _oracle(pred, gt, spacing, TOLS)
    assert dice_score(pred, gt) == pytest.approx(dsc, abs=1e-12)
    for t in TOLS:
        assert normalized_surface_dice(pred, gt, spacing, t) == pytest.approx(nsd[t], abs=1e-12)
    assert hausdorff_distance_95(pred, gt, spacing) == pytest.approx(hd, abs=1e-9)


def test_surface_tables_match_oracle_for_every_code():
    from medsam.metrics import _contour_length_table_2d, _surface_area_table_3d

    for spacing in [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9), (0.3, 1.7, 4.0)]:
        ref = sd.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
        np.testing.assert_allclose(_surface_area_table_3d(spacing), ref, rtol=1e-12, atol=1e-12)
    for spacing in [(1.0, 1.0), (0.7, 1.9)]:
        ref = sd.lookup_tables.create_table_neighbour_code_to_contour_length(spacing)
        np.testing.assert_allclose(_contour_length_table_2d(spacing), ref, rtol=1e-12, atol=1e-12)


def test_surface_distances_match_oracle_arrays():
    from medsam.metrics import _surface_distances

    rng = np.random.default_rng(7)
    spacing = (2.5, 0.7, 0.9)
    gt, pred = _blobs(rng, (12, 28, 26)), _blobs(rng, (12, 28, 26))
    ref = sd.compute_surface_distances(gt, pred, spacing)
    d_gt, a_gt, d_pred, a_pred = _surface_distances(pred, gt, spacing)
    np.testing.assert_array_equal(d_gt, ref["distances_gt_to_pred"])
    np.testing.assert_array_equal(d_pred, ref["distances_pred_to_gt"])
    np.testing.assert_allclose(a_gt, ref["surfel_areas_gt"], rtol=1e-12)
    np.testing.assert_allclose(a_pred, ref["surfel_areas_pred"], rtol=1e-12)


def test_non_bool_masks_are_foreground_where_non_zero():
    rng = np.random.default_rng(3)
    gt, pred = _blobs(rng, (30, 30)), _blobs(rng, (30, 30))
    sp = (1.0, 1.0)
    assert normalized_surface_dice(pred.astype(np.uint8) * 255, gt.astype(np.float32), sp) == pytest.approx(
        normalized_surface_dice(pred, gt, sp)
    )
    assert dice_score(pred.astype(np.int16) * 3, gt) == dice_score(pred, gt)


# --------------------------------------------------------------------------- hand-computed


def test_dice_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :] = True  # 4 voxels
    b[0, :2] = True  # 2 voxels, both inside a
    assert dice_score(b, a) == pytest.approx(2 * 2 / 6)
    b[1, 0] = True  # 3 voxels, 2 overlap
    assert dice_score(b, a) == pytest.approx(4 / 7)
    assert dice_score(a, a) == 1.0
    assert dice_score(a, ~a) == 0.0
    # any number of axes
    v = np.zeros((2, 3, 4, 5), bool)
    w = v.copy()
    v[0, 0, 0, :] = True
    w[0, 0, 0, :3] = True
    assert dice_score(w, v) == pytest.approx(6 / 8)
    assert dice_score([1, 1, 0], [1, 0, 0]) == pytest.approx(2 / 3)


def test_identical_masks_are_perfect():
    m = _ellipsoid((10, 20, 20), (5, 10, 10), (3, 6, 5))
    sp = (2.5, 0.7, 0.9)
    assert normalized_surface_dice(m, m, sp, 0.0) == 1.0
    assert hausdorff_distance_95(m, m, sp) == 0.0


def test_shift_by_one_slice_hd95_is_slice_thickness():
    gt = np.zeros((12, 20, 20), bool)
    gt[3:8, 5:15, 5:15] = True
    pred = np.roll(gt, 1, axis=0)
    sp = (2.5, 0.7, 0.9)
    assert hausdorff_distance_95(pred, gt, sp) == pytest.approx(2.5)
    assert normalized_surface_dice(pred, gt, sp, 2.5) == 1.0
    assert normalized_surface_dice(pred, gt, sp, 2.4) < 1.0


# --------------------------------------------------------------------------- empty masks


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_mask_conventions(ndim):
    shape = (6,) * ndim
    sp = (1.5,) * ndim
    empty = np.zeros(shape, bool)
    full = np.zeros(shape, bool)
    full[(slice(1, 4),) * ndim] = True
    # both empty
    assert dice_score(empty, empty) == 1.0
    assert normalized_surface_dice(empty, empty, sp) == 1.0
    assert hausdorff_distance_95(empty, empty, sp) == 0.0
    # exactly one empty, either way round
    for p, g in [(empty, full), (full, empty)]:
        assert dice_score(p, g) == 0.0
        assert normalized_surface_dice(p, g, sp) == 0.0
        assert hausdorff_distance_95(p, g, sp) == math.inf
    # the oracle gives inf for HD95 and NaN (which we never return) for DSC / NSD when both empty
    d = sd.compute_surface_distances(full, empty, sp)
    assert sd.compute_robust_hausdorff(d, 95) == math.inf
    assert sd.compute_surface_dice_at_tolerance(d, 2.0) == 0.0


def test_nsd_computed_even_when_dice_is_low():
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    pred = np.zeros_like(gt)
    pred[10:30, 10] = True  # a line on one edge: DSC << 0.2, but part of the surface agrees
    assert dice_score(pred, gt) < 0.2
    nsd = normalized_surface_dice(pred, gt, (1.0, 1.0), 2.0)
    _dsc, ref, _ = _oracle(pred, gt, (1.0, 1.0), (2.0,))
    assert 0.0 < nsd == pytest.approx(ref[2.0], abs=1e-12)


# --------------------------------------------------------------------------- label_scores


def test_label_scores_small_label_map():
    sp = (2.0, 0.8, 0.8)
    shape = (8, 24, 24)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    gt[2:6, 3:10, 3:10] = 1
    pred[2:6, 4:11, 3:10] = 1
    gt[1:7, 14:20, 12:20] = 2
    pred[1:6, 14:20, 12:20] = 2
    gt[3, 2, 20] = 4  # label 4 missed by the prediction
    pred[5, 20, 2:5] = 5  # label 5 only predicted
    rows = label_scores(pred, gt, sp, tolerance_mm=1.0)
    assert [r["label"] for r in rows] == [1, 2, 4, 5]
    for r in rows:
        assert set(r) == {"label", "dsc", "nsd", "hd95", "gt_voxels", "pred_voxels"}
        p, g = pred == r["label"], gt == r["label"]
        assert r["gt_voxels"] == int(g.sum()) and r["pred_voxels"] == int(p.sum())
        assert r["dsc"] == dice_score(p, g)
        assert r["nsd"] == normalized_surface_dice(p, g, sp, 1.0)
        assert r["hd95"] == hausdorff_distance_95(p, g, sp)
    for r in rows[:2]:
        dsc, nsd, hd = _oracle(pred == r["label"], gt == r["label"], sp, (1.0,))
        assert r["dsc"] == pytest.approx(dsc) and r["nsd"] == pytest.approx(nsd[1.0]) and r["hd95"] == pytest.approx(hd)
    assert (rows[2]["dsc"], rows[2]["nsd"], rows[2]["hd95"]) == (0.0, 0.0, math.inf)
    assert (rows[3]["dsc"], rows[3]["nsd"], rows[3]["hd95"]) == (0.0, 0.0, math.inf)

    # explicit labels, including one absent from both maps (both empty: perfect)
    rows = label_scores(pred.astype(np.float32), gt.astype(np.int32), sp, labels=[2, 3])
    assert [r["label"] for r in rows] == [2, 3]
    assert (rows[1]["dsc"], rows[1]["nsd"], rows[1]["hd95"], rows[1]["gt_voxels"]) == (1.0, 1.0, 0.0, 0)
    assert label_scores(np.zeros((4, 4), int), np.zeros((4, 4), int), (1, 1)) == []


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    a2 = np.zeros((5, 5), bool)
    a3 = np.zeros((4, 5, 5), bool)
    with pytest.raises(ValueError, match="shape"):
        dice_score(a2, np.zeros((5, 6), bool))
    with pytest.raises(ValueError, match="shape"):
        normalized_surface_dice(a3, a3[:3], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        normalized_surface_dice(a3, a3, (1.0, 1.0))  # one entry per axis
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(a2, a2, (1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(a2, a2, (1.0, -1.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(a2, a2, (1.0, float("nan")))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(a2, a2, 1.0)
    with pytest.raises(ValueError, match="2D or 3D"):
        normalized_surface_dice(np.zeros(5, bool), np.zeros(5, bool), (1.0,))
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(a2, a2, (1, 1), tolerance_mm=-1)
    with pytest.raises(ValueError, match="scalar"):
        dice_score(1, 1)
    with pytest.raises(ValueError, match="shape"):
        label_scores(a2.astype(int), a3.astype(int), (1, 1))
    with pytest.raises(ValueError, match="integer"):
        label_scores(np.full((5, 5), 0.5), a2.astype(int), (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        label_scores(a3.astype(int), a3.astype(int), (1, 1))
