"""RTSTRUCT and DICOM-SEG outputs, read back with pydicom / highdicom and rasterised independently
(scikit-image's polygon fill at pixel centres, even-odd across a slice's contours)."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from skimage.draw import polygon

from medsam.io import read_image, write_mask
from medsam.io.rtstruct import RT_STRUCTURE_SET_STORAGE, write_rtstruct
from test_io_dicom import _write_series


def real_ct_series(folder, n=4, step=5.0):
    """``n`` slices made from pydicom's real ``CT_small.dcm`` (128 x 128), one series, moved
    along the slice normal."""
    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    iop = np.asarray(source.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    for k in range(n):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.ImagePositionPatient = [float(v) for v in np.asarray(source.ImagePositionPatient, float) + k * step * normal]
        ds.InstanceNumber = k + 1
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.save_as(folder / f"ct_{k}.dcm")
    return folder


def rasterise_rtstruct(path, image):
    """{ROI name: label volume} from an RTSTRUCT, by pydicom, inverse geometry and polygon fill."""
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE and ds.Modality == "RTSTRUCT"
    slice_of = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(image.source_files)}
    inverse = np.linalg.inv(image.affine_lps)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    shape = image.spatial_shape if image.is_volume else (1, *image.spatial_shape)
    out = {}
    for item in ds.ROIContourSequence:
        volume = np.zeros(shape, bool)
        for contour in item.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            world = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert len(world) == contour.NumberOfContourPoints
            index = (inverse @ np.vstack([world.T, np.ones(len(world))]))[:3]
            if image.is_volume:
                np.testing.assert_allclose(index[2], k, atol=1e-4)  # on its slice's plane
            rr, cc = polygon(index[1], index[0], shape=shape[1:])
            filled = np.zeros(shape[1:], bool)
            filled[rr, cc] = True
            volume[k] ^= filled
        out[names[item.ReferencedROINumber]] = volume if image.is_volume else volume[0]
    return out


def awkward_mask(shape, seed=0):
    """Two labels with a hole, an island inside it, diagonal touches, pixels on the border and
    random noise (at least 6 x 8 pixels per slice)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[-2:]
    mask = np.zeros(shape, np.uint8)
    mask[..., 1 : rows - 1, 1 : cols - 1] = 1
    mask[..., 2 : rows - 2, 2 : cols - 2] = 0  # a hole
    mask[..., rows // 2, cols // 2] = 1  # an island inside it
    mask[..., 0, 0] = 2  # touches label 1 only diagonally
    mask[..., -1, :] = np.where(rng.random(cols) < 0.5, 2, 0)
    noise = rng.random(shape) < 0.15
    mask[noise] = rng.integers(0, 3, int(noise.sum()))
    return mask


@pytest.mark.parametrize("kind", ["real-ct", "oblique", "single-file"])
def test_rtstruct_round_trip_voxel_for_voxel(tmp_path, kind):
    if kind == "real-ct":
        image = read_image(real_ct_series(tmp_path / "ct"))
    elif kind == "oblique":
        s = np.sqrt(0.5)
        _write_series(tmp_path / "ob", 5, iop=(s, s, 0, 0, 0, 1), seed=3)
        image = read_image(tmp_path / "ob")
    else:
        image = read_image(get_testdata_file("CT_small.dcm"))
    mask = awkward_mask(image.spatial_shape)
    out = write_rtstruct(mask, image, tmp_path / "rt" / "rt.dcm", {1: "liver"})
    assert sorted(p.name for p in (tmp_path / "rt").iterdir()) == ["rt.dcm"]
    back = rasterise_rtstruct(out, image)
    assert set(back) == {"liver", "label 2"}
    np.testing.assert_array_equal(back["liver"], mask == 1)
    np.testing.assert_array_equal(back["label 2"], mask == 2)
    ds = pydicom.dcmread(out)
    source = pydicom.dcmread(image.source_files[0], stop_before_pixels=True)
    assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == source.FrameOfReferenceUID


def test_rtstruct_refusals(tmp_path):
    image = read_image(real_ct_series(tmp_path / "ct", n=2))
    with pytest.raises(ValueError, match="empty"):
        write_rtstruct(np.zeros(image.spatial_shape, np.uint8), image, tmp_path / "x.dcm")
    nifti = tmp_path / "m.nii.gz"
    write_mask(np.zeros(image.spatial_shape, np.uint8), image, nifti)
    with pytest.raises(ValueError, match="read from DICOM"):
        write_rtstruct(np.ones(image.spatial_shape, np.uint8), read_image(nifti), tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_cli_writes_dicom_seg_and_rtstruct_equal_to_the_nifti(tmp_path, small_default_model, capsys):
    """One run on a DICOM series: -o seg.dcm (DICOM-SEG) and --rtstruct, against the NIfTI of the
    same prompts, voxel for voxel."""
    hd = pytest.importorskip("highdicom")
    from medsam.cli import main

    series = real_ct_series(tmp_path / "ct")
    box = ["--box", "20", "30", "0", "90", "100", "3", "--box", "60", "10", "1", "120", "60", "2"]
    assert main(["segment", str(series), *box, "-o", str(tmp_path / "m.nii.gz")]) == 0
    assert (
        main(["segment", str(series), *box, "-o", str(tmp_path / "seg.dcm"), "--rtstruct", str(tmp_path / "rt.dcm")])
        == 0
    )
    image = read_image(series)
    labels = read_image(tmp_path / "m.nii.gz").array
    present = [int(v) for v in np.unique(labels) if v > 0]
    assert present, "the untrained model segmented nothing: the comparison would be empty"
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in image.source_files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    renumber = np.zeros(max(present) + 1, np.uint8)
    renumber[present] = np.arange(1, len(present) + 1)
    np.testing.assert_array_equal(pixels, renumber[labels])
    back = rasterise_rtstruct(tmp_path / "rt.dcm", image)
    for v in present:
        np.testing.assert_array_equal(back[f"object {v}"], labels == v)
    # a non-DICOM input cannot reference a series
    capsys.readouterr()
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((20, 20), np.uint8) + 80).save(png)
    assert main(["segment", str(png), "--box", "1", "1", "9", "9", "-o", str(tmp_path / "y.dcm")]) == 2
    assert (
        main(
            [
                "segment",
                str(png),
                "--box",
                "1",
                "1",
                "9",
                "9",
                "-o",
                str(tmp_path / "y.png"),
                "--rtstruct",
                str(tmp_path / "r.dcm"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "references a DICOM input" in err[0] and "must be DICOM" in err[1]
