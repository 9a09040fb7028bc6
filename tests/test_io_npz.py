"""CVPR 2024 'MedSAM on Laptop' npz cases: reading, validation and writing segs."""

from __future__ import annotations

import numpy as np
import pytest

from medsam.io import ImageReadError, read_npz_case, write_npz_segs


def test_read_2d_case(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    boxes = np.array([[1, 2, 10, 12], [5, 5, 25, 18]])
    gts = np.zeros((20, 30), np.uint8)
    path = tmp_path / "2DBox_Endoscopy_0001.npz"
    np.savez_compressed(path, imgs=imgs, boxes=boxes, gts=gts)
    case = read_npz_case(path)
    assert not case.is_volume and case.spatial_shape == (20, 30) and case.n_boxes == 2
    np.testing.assert_array_equal(case.imgs, imgs)
    np.testing.assert_array_equal(case.boxes, boxes)
    assert case.gts.shape == (20, 30) and case.spacing is None and case.spacing_zyx is None


def test_read_3d_case_spacing_order(tmp_path):
    imgs = np.zeros((7, 20, 30), np.uint8)  # (D, H, W)
    boxes = np.array([[3, 4, 1, 20, 15, 5]])  # [x0, y0, z0, x1, y1, z1]
    path = tmp_path / "3DBox_CT_0001.npz"
    np.savez_compressed(path, imgs=imgs, boxes=boxes, spacing=np.array([0.8, 0.7, 5.0]))
    case = read_npz_case(path)
    assert case.is_volume and case.spatial_shape == (7, 20, 30) and case.n_boxes == 1
    assert case.spacing_xyz == (0.8, 0.7, 5.0)
    assert case.spacing_zyx == (5.0, 0.7, 0.8)  # lines up with imgs' (D, H, W)
    assert case.gts is None


def test_volume_detected_without_prefix_and_single_box(tmp_path):
    np.savez(tmp_path / "case.npz", imgs=np.zeros((4, 9, 9), np.uint8), boxes=np.array([0, 0, 0, 3, 3, 2]))
    case = read_npz_case(tmp_path / "case.npz")
    assert case.is_volume and case.boxes.shape == (1, 6)
    np.savez(tmp_path / "img.npz", imgs=np.zeros((9, 9, 3), np.uint8))
    case = read_npz_case(tmp_path / "img.npz")
    assert not case.is_volume and case.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "name, arrays, match",
    [
        ("2D_a.npz", dict(imgs=np.zeros((9, 9, 3), np.uint8), boxes=np.zeros((2, 6))), r"\(N, 4\)"),
        ("3D_a.npz", dict(imgs=np.zeros((4, 9, 9), np.uint8), boxes=np.zeros((2, 4))), r"\(N, 6\)"),
        ("3D_b.npz", dict(imgs=np.zeros((9, 9), np.uint8)), r"\(D, H, W\)"),
        ("2D_b.npz", dict(imgs=np.zeros((9, 9, 5), np.uint8)), r"\(H, W, 3\)"),
        ("2D_c.npz", dict(imgs=np.zeros((9, 9, 3), np.uint8), gts=np.zeros((9, 8))), "gts shape"),
        ("2D_d.npz", dict(imgs=np.zeros((9, 9, 3), np.uint8), boxes=np.array([[5, 0, 2, 3]])), "min > max"),
        ("3D_c.npz", dict(imgs=np.zeros((4, 9, 9)), spacing=np.array([1.0, 1.0])), "spacing"),
        ("2D_e.npz", dict(gts=np.zeros((9, 9))), "no 'imgs'"),
    ],
)
def test_invalid_cases(tmp_path, name, arrays, match):
    path = tmp_path / name
    np.savez(path, **arrays)
    with pytest.raises(ImageReadError, match=match) as info:
        read_npz_case(path)
    assert name in str(info.value)


def test_corrupt_npz(tmp_path):
    path = tmp_path / "2D_bad.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ImageReadError, match=r"2D_bad\.npz"):
        read_npz_case(path)


def test_write_segs_round_trip(tmp_path):
    segs = np.zeros((4, 9, 9), np.int64)
    segs[1:3, 2:5, 2:5] = 1
    segs[0, 0, 0] = 2
    out = write_npz_segs(tmp_path / "out" / "3DBox_CT_0001.npz", segs, spacing=(0.8, 0.7, 5.0))
    with np.load(out) as data:
        assert set(data.files) == {"segs", "spacing"}
        assert data["segs"].dtype == np.uint8
        np.testing.assert_array_equal(data["segs"], segs)
        np.testing.assert_array_equal(data["spacing"], [0.8, 0.7, 5.0])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["3DBox_CT_0001.npz"]

    write_npz_segs(tmp_path / "2D.npz", np.ones((5, 6), bool))
    with np.load(tmp_path / "2D.npz") as data:
        assert set(data.files) == {"segs"} and data["segs"].dtype == np.uint8


def test_write_segs_refusals_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"0\.\.255"):
        write_npz_segs(tmp_path / "a.npz", np.full((3, 3), 300))
    with pytest.raises(ValueError, match="integer"):
        write_npz_segs(tmp_path / "a.npz", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_npz_segs(tmp_path / "a.npz", np.zeros((3,), np.uint8))
    assert list(tmp_path.iterdir()) == []
