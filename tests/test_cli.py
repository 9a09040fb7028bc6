"""``medsam segment`` on 2D files, and its handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from conftest import smooth_image
from medsam.cli import main

# These tests exercise the CLI, not the model: the fast untrained small default (conftest).
pytestmark = pytest.mark.usefixtures("small_default_model")


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "slice.png"
    Image.fromarray(smooth_image(80, 100, seed=3)).save(path)
    return path


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir())


def test_segment_png_one_box(tmp_path, png, capsys):
    out = tmp_path / "mask.png"
    code = main(
        ["segment", str(png), "--box", "10", "10", "60", "50", "-o", str(out), "--overlay", str(tmp_path / "ov.png")]
    )
    assert code == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (80, 100) and set(np.unique(mask)) <= {0, 1}
    report = json.loads((tmp_path / "mask.scores.json").read_text())
    assert len(report["scores"]) == 1 and report["boxes"] == [[10, 10, 60, 50]]
    assert report["model"]["untrained_default"] is True
    assert np.asarray(Image.open(tmp_path / "ov.png")).shape == (80, 100, 3)
    assert "meaningless" in capsys.readouterr().err


def test_segment_several_boxes_writes_labels(tmp_path, png):
    out = tmp_path / "labels.png"
    assert (
        main(["segment", str(png), "--box", "5", "5", "40", "40", "--box", "50", "30", "95", "75", "-o", str(out)]) == 0
    )
    assert set(np.unique(np.asarray(Image.open(out)))) <= {0, 1, 2}


def test_segment_2d_nifti_keeps_geometry(tmp_path):
    src = tmp_path / "slice.nii.gz"
    img = sitk.GetImageFromArray(smooth_image(40, 50, seed=4).astype(np.int16)[None] * 4 - 500)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(img, str(src))
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(src), "--box", "5", "5", "30", "30", "--modality", "CT", "-o", str(out)]) == 0
    np.testing.assert_allclose(nib.load(out).affine, nib.load(src).affine)
    assert nib.load(out).shape[:2] == nib.load(src).shape[:2]


def test_segment_single_dicom_file(tmp_path):
    from pydicom.data import get_testdata_file

    out = tmp_path / "ct_mask.nii.gz"
    assert main(["segment", get_testdata_file("CT_small.dcm"), "--box", "30", "40", "95", "100", "-o", str(out)]) == 0
    assert nib.load(out).shape[:2] == (128, 128)


def _bad_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_file", "not found"),
        ("corrupt_image", "slice_bad.png"),
        ("box_outside", "outside the image"),
        ("x1_le_x0", "empty"),
        ("wrong_checkpoint", "not a SAM/MedSAM checkpoint"),
        ("box_arity", "4 numbers"),
        ("dcm_output", ".dcm"),
    ],
)
def test_bad_input_one_clear_line_no_output(tmp_path, png, capsys, case, expected):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "mask.png"
    args = {
        "missing_file": ["segment", str(tmp_path / "absent.png"), "--box", "1", "1", "5", "5", "-o", str(out)],
        "corrupt_image": ["segment", str(tmp_path / "slice_bad.png"), "--box", "1", "1", "5", "5", "-o", str(out)],
        "box_outside": ["segment", str(png), "--box", "400", "10", "500", "50", "-o", str(out)],
        "x1_le_x0": ["segment", str(png), "--box", "60", "10", "60", "50", "-o", str(out)],
        "wrong_checkpoint": [
            "segment",
            str(png),
            "--box",
            "1",
            "1",
            "5",
            "5",
            "--checkpoint",
            str(_bad_checkpoint(tmp_path)),
            "-o",
            str(out),
        ],
        "box_arity": ["segment", str(png), "--box", "1", "1", "5", "-o", str(out)],
        "dcm_output": ["segment", str(png), "--box", "1", "1", "5", "5", "-o", str(out_dir / "mask.dcm")],
    }[case]
    (tmp_path / "slice_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("medsam: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert not any("Traceback" in line for line in err)
    assert _outputs(out_dir) == []


def test_console_script_reports_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsam.cli",
            "segment",
            str(tmp_path / "nope.png"),
            "--box",
            "1",
            "1",
            "5",
            "5",
            "-o",
            str(tmp_path / "m.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("medsam: error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.png").exists()


def _volume(tmp_path):
    z, y, x = np.mgrid[0:12, 0:48, 0:56]
    ball = ((z - 6) / 5.0) ** 2 + ((y - 24) / 14.0) ** 2 + ((x - 28) / 16.0) ** 2 <= 1
    arr = (ball * 300 + np.random.default_rng(0).normal(0, 20, ball.shape) - 100).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 3.0))
    img.SetOrigin((5.0, 6.0, 7.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def test_segment_volume_3d_box_keeps_geometry(tmp_path):
    src = _volume(tmp_path)
    out = tmp_path / "seg.nii.gz"
    code = main(
        [
            "segment",
            str(src),
            "--box",
            "12",
            "10",
            "2",
            "44",
            "38",
            "9",
            "--modality",
            "CT",
            "--iou-threshold=-1e9",
            "-o",
            str(out),
            "--overlay",
            str(tmp_path / "ov.png"),
        ]
    )
    assert code == 0
    seg = nib.load(out)
    np.testing.assert_allclose(seg.affine, nib.load(src).affine)
    data = np.asarray(seg.dataobj)  # nibabel order (i, j, k)
    assert data.shape == (56, 48, 12)
    # Never outside the box's slice range z0..z1 (k = 2..9).
    assert not data[:, :, :2].any() and not data[:, :, 10:].any()
    report = json.loads((tmp_path / "seg.scores.json").read_text())
    assert report["embeddings_computed"] <= 8
    assert report["objects"][0]["slices"][0] >= 2 and report["objects"][0]["slices"][1] <= 9


def test_segment_volume_key_slice_and_bad_boxes(tmp_path, capsys):
    src = _volume(tmp_path)
    out = tmp_path / "seg.nii.gz"
    assert (
        main(
            [
                "segment",
                str(src),
                "--box",
                "12",
                "10",
                "44",
                "38",
                "--slice",
                "6",
                "--iou-threshold=-1e9",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert nib.load(out).shape == (56, 48, 12)
    out.unlink()
    for args, expected in [
        (["--box", "12", "10", "44", "38"], "--slice"),
        (["--box", "12", "10", "44", "38", "--slice", "40"], "outside the volume"),
        (["--box", "12", "10", "14", "44", "38", "20"], "outside the volume"),
    ]:
        assert main(["segment", str(src), *args, "-o", str(out)]) == 2
        assert expected in capsys.readouterr().err
        assert not out.exists()


def test_segment_npz_case(tmp_path):
    from medsam.io import read_npz_case

    rng = np.random.default_rng(0)
    imgs = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    src = tmp_path / "2DBox_case.npz"
    np.savez_compressed(src, imgs=imgs, boxes=np.array([[5, 5, 30, 30], [20, 25, 60, 60]]))
    out = tmp_path / "2DBox_case_out.npz"
    assert main(["segment", str(src), "-o", str(out)]) == 0
    segs = np.load(out)["segs"]
    assert segs.shape == (64, 64) and segs.dtype == np.uint8 and set(np.unique(segs)) <= {0, 1, 2}
    assert read_npz_case(src).n_boxes == 2


def test_segment_npz_iou_threshold_reaches_3d_cases_only(tmp_path, capsys):
    from medsam.io import read_npz_case
    from medsam.model.registry import build_model
    from medsam.predictor import Predictor
    from medsam.volume import segment_npz_case

    vol = np.stack([smooth_image(48, 48, seed=3)] * 5)
    src = tmp_path / "3DBox_case.npz"
    np.savez_compressed(src, imgs=vol, boxes=np.array([[6, 6, 0, 40, 40, 4]]), spacing=[1.0, 1.0, 2.0])
    runs = {}
    for threshold in ("0.99", "-1e9"):
        out = tmp_path / f"out_{threshold}.npz"
        assert main(["segment", str(src), f"--iou-threshold={threshold}", "-o", str(out)]) == 0
        runs[threshold] = np.load(out)["segs"]
    assert not np.array_equal(runs["0.99"], runs["-1e9"])  # the random model's IoUs lie between
    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()  # the test's default model (see small_default_model)
    for threshold, segs in runs.items():
        expected = segment_npz_case(Predictor(model), read_npz_case(src), iou_threshold=float(threshold))
        np.testing.assert_array_equal(segs, expected)
    two_d = tmp_path / "2DBox_case.npz"
    np.savez_compressed(two_d, imgs=vol[0], boxes=np.array([[6, 6, 40, 40]]))
    assert main(["segment", str(two_d), "--iou-threshold", "0.5", "-o", str(tmp_path / "o2.npz")]) == 2
    assert "applies to 3D cases" in capsys.readouterr().err


def test_segment_zooms_small_2d_boxes_by_default_for_256px_models(tmp_path, png, capsys):
    """The embedded model (256 px input): a small box is segmented on its crop unless --no-zoom;
    --no-zoom gives the plain predictor's mask; --zoom with --no-zoom is refused."""
    import medsam
    from medsam.zoom import ZoomPolicy, predict_with_zoom

    image = np.asarray(Image.open(png))
    box = [20, 20, 29, 27]  # a 32 px crop of an 80 x 100 image: zoomed
    args = ["segment", str(png), "--box", *map(str, box)]
    assert main([*args, "-o", str(tmp_path / "auto.png")]) == 0
    err = capsys.readouterr().err
    assert "zoom: on for this 256 px model" in err and "zoom: 1 of 1 boxes" in err
    assert main([*args, "--no-zoom", "-o", str(tmp_path / "plain.png")]) == 0
    assert "zoom" not in capsys.readouterr().err
    with warnings.catch_warnings():  # the tests' default model is the untrained one
        warnings.simplefilter("ignore")
        predictor = medsam.Predictor(medsam.load_model(device="cpu"))
    predictor.set_image(image)
    zoomed = predict_with_zoom(predictor, image, np.array([box], float), ZoomPolicy())
    predictor.set_image(image)
    plain = predictor.predict(boxes=box, zoom=False)
    library = predictor.predict(boxes=box)  # the library's default is the CLI's: the model's recipe
    assert library.zoomed.tolist() == [True]
    np.testing.assert_array_equal(library.masks, zoomed.masks)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "auto.png")), zoomed.masks[0].astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "plain.png")), plain.masks[0].astype(np.uint8))
    assert main([*args, "--zoom", "--no-zoom", "-o", str(tmp_path / "x.png")]) == 2
    assert "exclude" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
