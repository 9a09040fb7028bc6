"""Tests of medsam.evaluate on a small temporary folder of NIfTI, PNG and npz pairs."""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medsam.evaluate import CSV_COLUMNS, SUMMARY_COLUMNS, evaluate, summarize
from medsam.metrics import label_scores

SITK_SPACING = (0.9, 0.7, 2.5)  # SimpleITK order (x, y, z)
ARRAY_SPACING = (2.5, 0.7, 0.9)  # array order (z, y, x)


def _nii_spacing(path):
    """Spacing stored in a NIfTI header (float32), read with nibabel and put in array order."""
    return tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[::-1])


def _box(shape, lo, hi, value, out=None):
    out = np.zeros(shape, np.uint8) if out is None else out
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def _write_nii(path, arr, spacing=SITK_SPACING):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def folders(tmp_path):
    """gt/ and pred/ with: two scored NIfTI cases, a shape mismatch, a missing prediction,
    a spacing mismatch, a PNG pair, an npz pair and a prediction without ground truth."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    shape = (8, 20, 18)
    expected = {}

    g = _box(shape, (2, 3, 3), (6, 12, 10), 1)
    _box(shape, (1, 13, 4), (7, 18, 15), 2, out=g)
    p = _box(shape, (2, 4, 3), (6, 12, 11), 1)
    _box(shape, (1, 13, 5), (6, 18, 15), 2, out=p)
    _write_nii(gt / "case_a.nii.gz", g)
    _write_nii(pred / "case_a.nii.gz", p)
    expected["case_a"] = (p, g, _nii_spacing(gt / "case_a.nii.gz"))

    g = _box(shape, (3, 5, 5), (7, 15, 14), 1)
    p = _box(shape, (3, 5, 6), (7, 15, 14), 1)
    p[0, 0, 0] = 3  # a stray label only in the prediction
    _write_nii(gt / "case_b.nii.gz", g)
    _write_nii(pred / "case_b.nii.gz", p)
    expected["case_b"] = (p, g, _nii_spacing(gt / "case_b.nii.gz"))

    _write_nii(gt / "case_shape.nii.gz", _box(shape, (2, 2, 2), (5, 5, 5), 1))
    _write_nii(pred / "case_shape.nii.gz", _box((8, 20, 17), (2, 2, 2), (5, 5, 5), 1))

    _write_nii(gt / "case_missing.nii.gz", _box(shape, (2, 2, 2), (5, 5, 5), 1))

    _write_nii(gt / "case_spacing.nii.gz", _box(shape, (2, 2, 2), (5, 5, 5), 1))
    _write_nii(pred / "case_spacing.nii.gz", _box(shape, (2, 2, 2), (5, 5, 5), 1), spacing=(0.9, 0.7, 3.0))

    g2 = _box((32, 30), (5, 6), (20, 22), 1)
    _box((32, 30), (22, 3), (28, 12), 2, out=g2)
    p2 = _box((32, 30), (6, 6), (21, 21), 1)
    _box((32, 30), (23, 3), (29, 14), 2, out=p2)
    Image.fromarray(g2).save(gt / "slice.png")
    Image.fromarray(p2).save(pred / "slice.png")
    expected["slice"] = (p2, g2, (1.0, 1.0))

    g3 = _box((6, 16, 16), (1, 4, 4), (5, 12, 11), 1)
    p3 = _box((6, 16, 16), (1, 5, 4), (4, 12, 12), 1)
    np.savez_compressed(gt / "3D_case.npz", imgs=np.zeros_like(g3), gts=g3, spacing=np.array(SITK_SPACING))
    np.savez_compressed(pred / "3D_case.npz", segs=p3)
    expected["3D_case"] = (p3, g3, ARRAY_SPACING)

    _write_nii(pred / "orphan.nii.gz", _box(shape, (2, 2, 2), (5, 5, 5), 1))
    (pred / "notes.txt").write_text("ignored: unsupported extension")
    return gt, pred, expected


def test_folder_evaluation_rows_match_direct_metric_calls(folders, tmp_path):
    gt, pred, expected = folders
    out, summary = tmp_path / "out" / "scores.csv", tmp_path / "out" / "summary.csv"
    res = evaluate(pred, gt, out, tolerance_mm=1.5, summary_csv=summary, dataset="toy", modality="CT")

    rows = _read_csv(out)
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == len(res.rows)
    assert all(r["dataset"] == "toy" and r["modality"] == "CT" for r in rows)

    for case, (p, g, spacing) in expected.items():
        got = [r for r in rows if r["case"] == case]
        ref = label_scores(p, g, spacing, tolerance_mm=1.5)
        assert [int(r["label"]) for r in got] == [s["label"] for s in ref], case
        for r, s in zip(got, ref):
            assert r["error"] == ""
            assert float(r["dsc"]) == s["dsc"] and float(r["nsd"]) == s["nsd"] and float(r["hd95"]) == s["hd95"]
            assert int(r["gt_voxels"]) == s["gt_voxels"] and int(r["pred_voxels"]) == s["pred_voxels"]
            assert 0 <= float(r["dsc"]) <= 1 and 0 <= float(r["nsd"]) <= 1

    # the stray predicted label 3 of case_b scores 0 / 0 / inf
    stray = next(r for r in rows if r["case"] == "case_b" and r["label"] == "3")
    assert (float(stray["dsc"]), float(stray["nsd"]), float(stray["hd95"])) == (0.0, 0.0, math.inf)

    # the NIfTI spacing was reversed to array order: unreversed gives other numbers
    p, g, _ = expected["case_a"]
    wrong = label_scores(p, g, SITK_SPACING, tolerance_mm=1.5)
    a = [r for r in rows if r["case"] == "case_a"]
    assert any(float(r["nsd"]) != w["nsd"] or float(r["hd95"]) != w["hd95"] for r, w in zip(a, wrong))

    errors = {r["case"]: r for r in rows if r["error"]}
    assert set(errors) == {"case_shape", "case_missing", "case_spacing", "orphan"}
    assert "shape mismatch" in errors["case_shape"]["error"]
    assert "missing prediction" in errors["case_missing"]["error"]
    assert "spacing mismatch" in errors["case_spacing"]["error"]
    assert "no ground truth" in errors["orphan"]["error"]
    for r in errors.values():
        assert r["dsc"] == r["nsd"] == r["hd95"] == r["label"] == ""
    assert len(res.errors) == 4

    # summary: read back and compare with means of the scored rows
    srows = _read_csv(summary)
    assert tuple(srows[0].keys()) == SUMMARY_COLUMNS
    scored = [r for r in rows if not r["error"]]
    overall = next(s for s in srows if (s["dataset"], s["modality"], s["label"]) == ("all", "all", "all"))
    assert int(overall["n"]) == len(scored) and int(overall["n_errors"]) == 4
    assert float(overall["dsc_mean"]) == pytest.approx(np.mean([float(r["dsc"]) for r in scored]))
    assert float(overall["nsd_std"]) == pytest.approx(np.std([float(r["nsd"]) for r in scored]))
    lab1 = next(s for s in srows if (s["dataset"], s["modality"], s["label"]) == ("toy", "CT", "1"))
    ones = [float(r["nsd"]) for r in scored if r["label"] == "1"]
    assert int(lab1["n"]) == len(ones) == 4
    assert float(lab1["nsd_mean"]) == pytest.approx(np.mean(ones))
    group = next(s for s in srows if (s["dataset"], s["modality"], s["label"]) == ("toy", "CT", "all"))
    assert int(group["n"]) == len(scored)
    assert res.summary == summarize(res.rows)

    # atomic writes leave no temporary file behind
    assert sorted(f.name for f in out.parent.iterdir()) == ["scores.csv", "summary.csv"]


def test_single_file_pair_and_png_0_255(tmp_path):
    g = _box((10, 12, 14), (2, 3, 3), (8, 9, 10), 1)
    p = _box((10, 12, 14), (2, 4, 3), (8, 9, 11), 1)
    _write_nii(tmp_path / "g.nii.gz", g)
    _write_nii(tmp_path / "p.nii.gz", p)
    res = evaluate(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz", tmp_path / "o.csv")
    (row,) = res.rows
    ref = label_scores(p, g, _nii_spacing(tmp_path / "g.nii.gz"))[0]
    assert row["case"] == "g" and row["label"] == 1 and row["dataset"] == ""
    assert (row["dsc"], row["nsd"], row["hd95"]) == (ref["dsc"], ref["nsd"], ref["hd95"])
    assert res.summary_csv is None and (tmp_path / "o.csv").exists()

    # an 8-bit 0/255 mask is read as label 1, matching a 0/1 ground truth
    g2 = _box((20, 20), (4, 4), (14, 15), 1)
    Image.fromarray(g2).save(tmp_path / "g.png")
    Image.fromarray(g2 * 255).save(tmp_path / "p.png")
    res = evaluate(tmp_path / "p.png", tmp_path / "g.png", tmp_path / "o.csv")
    assert [(r["label"], r["dsc"], r["nsd"], r["hd95"]) for r in res.rows] == [(1, 1.0, 1.0, 0.0)]


def test_bad_arguments(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    f = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(f)
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "nope", tmp_path / "d", tmp_path / "o.csv")
    with pytest.raises(ValueError, match="both"):
        evaluate(f, tmp_path / "d", tmp_path / "o.csv")
    with pytest.raises(ValueError, match="no ground-truth file"):
        evaluate(tmp_path / "e", tmp_path / "d", tmp_path / "o.csv")
    with pytest.raises(ValueError, match="tolerance"):
        evaluate(f, f, tmp_path / "o.csv", tolerance_mm=-1)
    # an all-background pair is flagged, not silently dropped
    res = evaluate(f, f, tmp_path / "o.csv")
    assert len(res.rows) == 1 and "no foreground" in res.rows[0]["error"]
