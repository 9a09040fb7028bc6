"""DICOM reading: series sorting along the slice normal, several series, single and multi-frame files."""

from __future__ import annotations

import random

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsam.io import ImageReadError, list_dicom_series, read_image, write_mask

ROWS, COLS = 6, 8
PIXEL_SPACING = (0.7, 0.9)  # DICOM order: (between rows = y, between columns = x)
SLICE_STEP = 2.5


def _base(sop_class, series_uid, study_uid, description, modality="CT"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.StudyDate = "20240101"
    ds.SeriesNumber = 1
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    return ds


def _slice_values(k):
    """Stored values of slice k, (rows, cols); HU = stored - 1024."""
    return (np.arange(ROWS * COLS).reshape(ROWS, COLS) + 100 * k).astype(np.int16)


def _write_series(
    folder, n, *, iop=(1, 0, 0, 0, 1, 0), origin=(-50.0, -60.0, 10.0), description="axial", study_uid=None, seed=0
):
    """Write n CT slices with shuffled file names and instance numbers; returns (uid, normal)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    study_uid = study_uid or generate_uid()
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for file_no, k in enumerate(order):
        ds = _base(CTImageStorage, series_uid, study_uid, description)
        ds.InstanceNumber = n - file_no  # deliberately unrelated to position
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * SLICE_STEP * normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_STEP
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = _slice_values(k).astype("<i2").tobytes()
        ds.save_as(folder / f"img_{file_no:03d}_{seed}.dcm", enforce_file_format=True)
    return series_uid, normal


def test_series_sorted_by_position_not_file_order(tmp_path):
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # oblique coronal-ish; normal is not +z
    uid, normal = _write_series(tmp_path / "ct", 5, iop=iop)
    img = read_image(tmp_path / "ct")

    assert img.is_volume and img.array.shape == (5, ROWS, COLS)
    expected = np.stack([_slice_values(k) for k in range(5)]).astype(np.int32) - 1024
    np.testing.assert_array_equal(img.array.astype(np.int32), expected)
    np.testing.assert_allclose(img.spacing, (PIXEL_SPACING[1], PIXEL_SPACING[0], SLICE_STEP), atol=1e-5)
    np.testing.assert_allclose(img.spacing_zyx, (SLICE_STEP, PIXEL_SPACING[0], PIXEL_SPACING[1]), atol=1e-5)
    np.testing.assert_allclose(img.origin, (-50.0, -60.0, 10.0), atol=1e-5)
    np.testing.assert_allclose(img.direction[:, 0], iop[:3], atol=1e-6)
    np.testing.assert_allclose(img.direction[:, 1], iop[3:], atol=1e-6)
    np.testing.assert_allclose(img.direction[:, 2], normal, atol=1e-6)
    assert img.series_uid == uid and img.modality == "CT" and img.source_format == "dicom-series"
    assert len(img.source_files) == 5
    for k, f in enumerate(img.source_files):  # array[k] comes from source_files[k]
        assert int(pydicom.dcmread(f).pixel_array[0, 0]) == 100 * k

    # masks for DICOM input go to NIfTI, with the series geometry
    mask = (np.arange(5 * ROWS * COLS).reshape(5, ROWS, COLS) % 3).astype(np.uint8)
    out = write_mask(mask, img, tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, img.affine_ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask.transpose(2, 1, 0))
    # RAS position of voxel (i, j, k) = (0, 0, 4) is slice 4's ImagePositionPatient, x/y negated
    ipp4 = np.asarray((-50.0, -60.0, 10.0)) + 4 * SLICE_STEP * normal
    np.testing.assert_allclose((written.affine @ [0, 0, 4, 1])[:3], ipp4 * [-1, -1, 1], atol=1e-4)
    with pytest.raises(ValueError, match=r"\.nii\.gz"):
        write_mask(mask, img, tmp_path / "mask.dcm")


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "mixed"
    uid_a, _ = _write_series(folder, 3, description="first", seed=1)
    uid_b, _ = _write_series(folder, 2, description="second", seed=2, origin=(0.0, 0.0, -20.0))

    infos = {i.series_uid: i for i in list_dicom_series(folder)}
    assert set(infos) == {uid_a, uid_b}
    assert infos[uid_a].n_slices == 3 and infos[uid_a].description == "first"
    assert infos[uid_b].n_slices == 2 and infos[uid_b].modality == "CT"

    with pytest.raises(ImageReadError) as info:
        read_image(folder)
    assert uid_a in str(info.value) and uid_b in str(info.value)
    assert "series_uid" in str(info.value)

    img = read_image(folder, series_uid=uid_b)
    assert img.array.shape == (2, ROWS, COLS) and img.series_uid == uid_b
    np.testing.assert_allclose(img.origin, (0.0, 0.0, -20.0), atol=1e-5)
    with pytest.raises(ImageReadError, match="no series"):
        read_image(folder, series_uid="1.2.3.4")


def test_single_dicom_file_is_2d_with_3d_geometry(tmp_path):
    _write_series(tmp_path / "one", 1, origin=(1.0, 2.0, 3.0))
    (path,) = sorted((tmp_path / "one").iterdir())
    img = read_image(path)
    assert not img.is_volume and img.array.shape == (ROWS, COLS)
    assert img.geometry_ndim == 3
    np.testing.assert_array_equal(img.array.astype(np.int32), _slice_values(0).astype(np.int32) - 1024)
    np.testing.assert_allclose(img.spacing_zyx, PIXEL_SPACING, atol=1e-6)
    np.testing.assert_allclose(img.origin, (1.0, 2.0, 3.0), atol=1e-6)
    assert img.source_format == "dicom" and img.modality == "CT"

    # files without extension are recognised by the DICM preamble
    bare = tmp_path / "IM0001"
    bare.write_bytes(path.read_bytes())
    assert read_image(bare).array.shape == (ROWS, COLS)


def test_multiframe_dicom_is_volume(tmp_path):
    sop = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
    ds = _base(sop, generate_uid(), generate_uid(), "mf", modality="OT")
    ds.NumberOfFrames = 4
    ds.PixelRepresentation = 0
    frames = np.stack([_slice_values(k) for k in range(4)]).astype(np.uint16)
    ds.PixelData = frames.astype("<u2").tobytes()
    path = tmp_path / "mf.dcm"
    ds.save_as(path, enforce_file_format=True)
    img = read_image(path)
    assert img.is_volume and img.array.shape == (4, ROWS, COLS)
    np.testing.assert_array_equal(img.array, frames)


def test_duplicate_slice_positions_refused(tmp_path):
    folder = tmp_path / "dup"
    _uid, _ = _write_series(folder, 3)
    extra = pydicom.dcmread(next(folder.iterdir()))
    extra.SOPInstanceUID = generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.save_as(folder / "copy.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="same position"):
        read_image(folder)


def test_empty_folder_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no dicom here")
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_image(tmp_path)


def test_missing_slice_warns_about_spacing(tmp_path):
    folder = tmp_path / "gap"
    _write_series(folder, 5, seed=3)
    victim = next(f for f in sorted(folder.iterdir()) if pydicom.dcmread(f).pixel_array[0, 0] == 200)
    victim.unlink()  # slice k = 2 is missing
    with pytest.warns(RuntimeWarning, match="not uniform"):
        img = read_image(folder)
    assert img.array.shape == (4, ROWS, COLS)


def test_dicom_seg_round_trip(tmp_path):
    hd = pytest.importorskip("highdicom")
    from medsam.io import write_dicom_seg

    _write_series(tmp_path / "ct", 5, seed=4)
    img = read_image(tmp_path / "ct")
    mask = np.zeros(img.spatial_shape, np.uint8)
    mask[1:4, 1:4, 2:6] = 1
    mask[2, 0, 0] = 3  # label 2 absent: segments are renumbered 1..N
    out = write_dicom_seg(mask, img, tmp_path / "seg" / "seg.dcm", {1: "liver"})
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["seg.dcm"]

    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "label 3"]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in img.source_files]
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(labels, np.where(mask == 3, 2, mask))

    with pytest.raises(ValueError, match="empty"):
        write_dicom_seg(np.zeros_like(mask), img, tmp_path / "empty.dcm")
    png_like = img.with_array(img.array)
    png_like.source_format = "png"
    with pytest.raises(ValueError, match="read from DICOM"):
        write_dicom_seg(mask, png_like, tmp_path / "x.dcm")
    assert not (tmp_path / "empty.dcm").exists()
