"""Round trips through medsam.io for the file formats that carry geometry, and 2D formats.

Every written file is checked with a library other than the one that wrote it
(nibabel for NIfTI, a hand parser for NRRD/MHA headers, Pillow/tifffile for
2D formats), so an axis swap or a transposed direction cannot cancel out.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from medsam.io import ImageReadError, MedicalImage, check_same_geometry, read_image, write_mask


# ----------------------------------------------------------------- helpers
def _rotation(axis, angle_deg):
    axis = np.asarray(axis, dtype=float)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


# oblique rotation with the first index axis flipped (det = -1) - the hard case
DIRECTION = _rotation([1, 2, 3], 25) @ np.diag([-1.0, 1.0, 1.0])
SPACING = (0.8, 0.65, 2.5)  # (x, y, z) - all different so a reversal shows
ORIGIN = (-12.5, 30.25, 7.0)
SIZE_XYZ = (7, 6, 5)  # i, j, k extents: array is (5, 6, 7)


def _voxels():
    """Distinct values, array order (Z, Y, X)."""
    return np.arange(np.prod(SIZE_XYZ), dtype=np.int16).reshape(SIZE_XYZ[::-1])


def _mask_for(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, size=shape).astype(np.uint8)


def _lps_affine(direction, spacing, origin):
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction) * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


def _ras_affine(direction, spacing, origin):
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ _lps_affine(direction, spacing, origin)


def _parse_text_header(raw: bytes, sep: bytes, kv: str):
    """Split a NRRD / MetaImage file into (header dict, data bytes) without any imaging library."""
    head, _, data = raw.partition(sep)
    fields = {}
    for line in head.decode("ascii").splitlines():
        if not line or line.startswith("#") or kv not in line:
            continue
        k, v = line.split(kv, 1)
        fields[k.strip()] = v.strip()
    return fields, data


def _nrrd_vectors(text):
    return np.array([[float(x) for x in v.strip("()").split(",")] for v in text.split()])


def _assert_no_leftovers(folder: Path, expected: set[str]):
    assert {p.name for p in folder.iterdir()} == expected


# ----------------------------------------------------------------- NIfTI
def _write_nifti_source(path, data_zyx, direction=DIRECTION, spacing=SPACING, origin=ORIGIN):
    affine = _ras_affine(direction, spacing, origin)
    img = nib.Nifti1Image(np.ascontiguousarray(data_zyx.transpose(2, 1, 0)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_oblique_flipped_round_trip(tmp_path, suffix):
    src = tmp_path / f"img{suffix}"
    affine = _write_nifti_source(src, _voxels())
    img = read_image(src)

    assert img.is_volume and not img.is_color and img.ndim_spatial == 3
    assert img.array.shape == (5, 6, 7)  # (Z, Y, X)
    np.testing.assert_array_equal(img.array, _voxels())
    np.testing.assert_allclose(img.spacing, SPACING, atol=1e-5)
    np.testing.assert_allclose(img.spacing_zyx, SPACING[::-1], atol=1e-5)
    np.testing.assert_allclose(img.origin, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(img.direction, DIRECTION, atol=1e-5)
    np.testing.assert_allclose(img.affine_ras, affine, atol=1e-4)
    assert img.source_format == "nifti" and img.source_path == src

    mask = _mask_for(img.spatial_shape)
    out = write_mask(mask, img, tmp_path / f"mask{suffix}")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    np.testing.assert_allclose(written.get_qform(), affine, atol=1e-4)
    np.testing.assert_allclose(written.get_sform(), affine, atol=1e-4)
    assert written.header["sform_code"] > 0 and written.header["qform_code"] > 0
    data = np.asarray(written.dataobj)
    assert data.dtype == np.uint8
    # nibabel indexes (i, j, k): our (Z, Y, X) array transposed
    np.testing.assert_array_equal(data, mask.transpose(2, 1, 0))

    back = read_image(out)
    check_same_geometry(back, img)
    np.testing.assert_array_equal(back.array, mask)


def test_nifti_singleton_third_axis_is_2d_and_keeps_geometry(tmp_path):
    src = tmp_path / "slice.nii.gz"
    data = np.arange(42, dtype=np.int16).reshape(1, 6, 7)
    affine = _write_nifti_source(src, data)
    img = read_image(src)
    assert not img.is_volume and img.ndim_spatial == 2 and not img.is_color
    assert img.array.shape == (6, 7)
    assert img.geometry_ndim == 3 and img.size_xyz == (7, 6, 1)
    np.testing.assert_allclose(img.spacing_zyx, (SPACING[1], SPACING[0]), atol=1e-5)
    np.testing.assert_array_equal(img.array, data[0])

    mask = _mask_for((6, 7))
    out = write_mask(mask, img, tmp_path / "slice_mask.nii.gz")
    written = nib.load(str(out))
    assert written.shape == (7, 6, 1)
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, 0], mask.T)


def test_nifti_4d_refused(tmp_path):
    path = tmp_path / "dyn.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4)), str(path))
    with pytest.raises(ImageReadError, match=r"dyn\.nii\.gz.*4D"):
        read_image(path)


def test_nifti_4d_with_single_volume_is_3d(tmp_path):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.int16), np.eye(4)), str(path))
    assert read_image(path).array.shape == (6, 5, 4)


def test_vector_volume_refused(tmp_path):
    path = tmp_path / "field.mha"
    vec = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(path))
    with pytest.raises(ImageReadError, match="3 components per voxel"):
        read_image(path)


# ----------------------------------------------------------------- NRRD
def _write_nrrd_by_hand(path, data_zyx):
    """A raw little-endian NRRD written without any imaging library."""
    dirs = " ".join("(" + ",".join(repr(float(v)) for v in DIRECTION[:, d] * SPACING[d]) + ")" for d in range(3))
    header = (
        "NRRD0004\n"
        "type: short\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {SIZE_XYZ[0]} {SIZE_XYZ[1]} {SIZE_XYZ[2]}\n"
        f"space directions: {dirs}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: raw\n"
        f"space origin: ({ORIGIN[0]!r},{ORIGIN[1]!r},{ORIGIN[2]!r})\n\n"
    )
    # NRRD: first axis (i) fastest == C order of the (Z, Y, X) array
    path.write_bytes(header.encode() + data_zyx.astype("<i2").tobytes())


def test_nrrd_oblique_flipped_round_trip(tmp_path):
    src = tmp_path / "img.nrrd"
    _write_nrrd_by_hand(src, _voxels())
    img = read_image(src)
    assert img.array.shape == (5, 6, 7)
    np.testing.assert_array_equal(img.array, _voxels())
    np.testing.assert_allclose(img.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(img.origin, ORIGIN, atol=1e-6)
    np.testing.assert_allclose(img.direction, DIRECTION, atol=1e-6)
    assert img.source_format == "nrrd"

    mask = _mask_for(img.spatial_shape, seed=1)
    out = write_mask(mask, img, tmp_path / "mask.nrrd")
    fields, data = _parse_text_header(out.read_bytes(), b"\n\n", ":")
    assert fields["space"] == "left-posterior-superior"
    assert fields["sizes"] == "7 6 5"
    assert fields["type"] in ("unsigned char", "uchar", "uint8")
    np.testing.assert_allclose(
        _nrrd_vectors(fields["space directions"]), (DIRECTION * np.asarray(SPACING)).T, atol=1e-6
    )
    np.testing.assert_allclose(_nrrd_vectors(fields["space origin"])[0], ORIGIN, atol=1e-6)
    raw = gzip.decompress(data) if fields["encoding"] == "gzip" else data
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(5, 6, 7), mask)
    check_same_geometry(read_image(out), img)


def test_nhdr_detached_header(tmp_path):
    src = tmp_path / "img.nrrd"
    _write_nrrd_by_hand(src, _voxels())
    img = read_image(src)
    mask = _mask_for(img.spatial_shape, seed=2)
    out = write_mask(mask, img, tmp_path / "mask.nhdr")
    back = read_image(out)
    check_same_geometry(back, img)
    np.testing.assert_array_equal(back.array, mask)
    names = {p.name for p in tmp_path.iterdir()}
    assert "mask.nhdr" in names and not any(n.startswith(".") for n in names)


# ----------------------------------------------------------------- MetaImage
def _write_mha_by_hand(path, data_zyx):
    # TransformMatrix lists the index-axis vectors one after the other (column-major)
    tm = " ".join(repr(float(v)) for v in DIRECTION.T.reshape(-1))
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\n"
        f"TransformMatrix = {tm}\n"
        f"Offset = {ORIGIN[0]!r} {ORIGIN[1]!r} {ORIGIN[2]!r}\n"
        f"ElementSpacing = {SPACING[0]!r} {SPACING[1]!r} {SPACING[2]!r}\n"
        f"DimSize = {SIZE_XYZ[0]} {SIZE_XYZ[1]} {SIZE_XYZ[2]}\n"
        "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + data_zyx.astype("<i2").tobytes())


def test_mha_oblique_flipped_round_trip(tmp_path):
    src = tmp_path / "img.mha"
    _write_mha_by_hand(src, _voxels())
    img = read_image(src)
    np.testing.assert_array_equal(img.array, _voxels())
    np.testing.assert_allclose(img.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(img.origin, ORIGIN, atol=1e-6)
    np.testing.assert_allclose(img.direction, DIRECTION, atol=1e-6)
    assert img.source_format == "metaimage"

    mask = _mask_for(img.spatial_shape, seed=3)
    out = write_mask(mask, img, tmp_path / "mask.mha")
    fields, data = _parse_text_header(out.read_bytes(), b"ElementDataFile = LOCAL\n", "=")
    np.testing.assert_allclose(np.array(fields["TransformMatrix"].split(), float).reshape(3, 3).T, DIRECTION, atol=1e-6)
    np.testing.assert_allclose(np.array(fields["Offset"].split(), float), ORIGIN, atol=1e-6)
    np.testing.assert_allclose(np.array(fields["ElementSpacing"].split(), float), SPACING, atol=1e-6)
    assert fields["DimSize"].split() == ["7", "6", "5"]
    assert fields["ElementType"] == "MET_UCHAR"
    raw = zlib.decompress(data) if fields.get("CompressedData") == "True" else data
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint8).reshape(5, 6, 7), mask)


def test_mhd_writes_header_and_data_pair(tmp_path):
    src = tmp_path / "img.mha"
    _write_mha_by_hand(src, _voxels())
    img = read_image(src)
    mask = _mask_for(img.spatial_shape, seed=4)
    (tmp_path / "out").mkdir()
    out = write_mask(mask, img, tmp_path / "out" / "mask.mhd")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "mask.mhd" in names and len(names) == 2, names  # header + (z)raw, no temp folder
    fields, _ = _parse_text_header(out.read_bytes(), b"\0", "=")
    assert (tmp_path / "out" / fields["ElementDataFile"]).exists()
    back = read_image(out)
    check_same_geometry(back, img)
    np.testing.assert_array_equal(back.array, mask)


# ----------------------------------------------------------------- 2D formats
def test_png_grey_uint8_and_uint16(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.array.shape == (12, 10) and img.array.dtype == np.uint8
    assert not img.is_volume and not img.is_color and img.ndim_spatial == 2
    np.testing.assert_array_equal(img.array, grey)
    assert img.spacing == (1.0, 1.0) and img.spacing_zyx == (1.0, 1.0)

    deep = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    img16 = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(img16.array.astype(np.int64), deep.astype(np.int64))


def test_png_rgb_rgba_palette(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    img = read_image(tmp_path / "c.png")
    assert img.is_color and img.array.shape == (9, 11, 3) and img.spatial_shape == (9, 11)
    np.testing.assert_array_equal(img.array, rgb)

    rgba = np.dstack([rgb, np.full((9, 11), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.array.shape == (9, 11, 3)
    np.testing.assert_array_equal(img.array, rgb)

    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").array.shape == (9, 11, 3)


def test_png_mask_round_trip(tmp_path):
    rgb = np.zeros((9, 11, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    img = read_image(tmp_path / "c.png")
    mask = _mask_for((9, 11))
    write_mask(mask, img, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), mask)

    big = mask.astype(np.int32) * 1000
    write_mask(big, img, tmp_path / "m16.png")
    with Image.open(tmp_path / "m16.png") as im:
        np.testing.assert_array_equal(np.asarray(im).astype(np.int64), big)
    assert read_image(tmp_path / "m16.png").array.dtype == np.uint16


def test_jpeg_and_bmp(tmp_path):
    rgb = np.full((8, 8, 3), 120, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    img = read_image(tmp_path / "x.jpg")
    assert img.is_color and img.array.shape == (8, 8, 3) and img.source_format == "jpeg"
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "x.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "x.bmp").array, grey)


def test_tiff_single_page_and_rgb(tmp_path):
    grey = np.arange(30, dtype=np.uint16).reshape(5, 6)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    img = read_image(tmp_path / "g.tif")
    assert img.array.shape == (5, 6) and not img.is_volume
    np.testing.assert_array_equal(img.array, grey)

    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tiff", rgb, photometric="rgb")
    img = read_image(tmp_path / "c.tiff")
    assert img.is_color and img.array.shape == (5, 6, 3)
    np.testing.assert_array_equal(img.array, rgb)


def test_multipage_tiff_is_zyx_stack(tmp_path):
    stack = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    # pages written one by one with Pillow (an independent writer): page k -> array[k]
    pages = [Image.fromarray(p.astype(np.uint8)) for p in stack]
    pages[0].save(tmp_path / "pil.tif", save_all=True, append_images=pages[1:])
    img = read_image(tmp_path / "pil.tif")
    assert img.is_volume and img.array.shape == (4, 5, 6)
    np.testing.assert_array_equal(img.array, stack.astype(np.uint8))

    tifffile.imwrite(
        tmp_path / "ij.tif",
        stack,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"},
    )
    img = read_image(tmp_path / "ij.tif")
    assert img.array.shape == (4, 5, 6)
    np.testing.assert_allclose(img.spacing, (0.5, 0.25, 3.0))
    np.testing.assert_allclose(img.spacing_zyx, (3.0, 0.25, 0.5))

    mask = _mask_for((4, 5, 6), seed=5)
    write_mask(mask, img, tmp_path / "mask.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), mask)
    np.testing.assert_array_equal(read_image(tmp_path / "mask.tif").array, mask)


def test_tiff_4d_refused(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((2, 3, 4, 5), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ImageReadError, match=r"t\.tif.*4D"):
        read_image(tmp_path / "t.tif")


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name", ["bad.nii.gz", "bad.nii", "bad.nrrd", "bad.mha", "bad.png", "bad.jpg", "bad.tif", "bad.dcm"]
)
def test_corrupt_files_raise_image_read_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image\x00\x01\x02" * 20)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "Exception thrown in SimpleITK" not in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_truncated_nifti_refused(tmp_path):
    src = tmp_path / "full.nii"
    _write_nifti_source(src, _voxels())
    cut = tmp_path / "cut.nii"
    cut.write_bytes(src.read_bytes()[:400])
    with pytest.raises(ImageReadError, match=r"cut\.nii"):
        read_image(cut)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "x.xyz").write_bytes(b"123")
    with pytest.raises(ImageReadError, match="unknown image format"):
        read_image(tmp_path / "x.xyz")


def _small_volume():
    return MedicalImage(np.zeros((3, 4, 5), np.int16), SPACING, ORIGIN, DIRECTION)


def test_write_mask_shape_mismatch_leaves_nothing(tmp_path):
    img = _small_volume()
    with pytest.raises(ValueError, match=r"mask shape \(5, 4, 3\).*\(3, 4, 5\)"):
        write_mask(np.zeros((5, 4, 3), np.uint8), img, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="integer"):
        write_mask(np.zeros((3, 4, 5), np.float32), img, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match=r"nii\.gz"):
        write_mask(np.zeros((3, 4, 5), np.uint8), img, tmp_path / "m.dcm")
    with pytest.raises(ValueError, match="2D"):
        write_mask(np.zeros((3, 4, 5), np.uint8), img, tmp_path / "m.png")
    with pytest.raises(ValueError, match="unknown mask format"):
        write_mask(np.zeros((3, 4, 5), np.uint8), img, tmp_path / "m.foo")
    _assert_no_leftovers(tmp_path, set())


def test_write_is_atomic_on_writer_failure(tmp_path, monkeypatch):
    img = _small_volume()
    target = tmp_path / "m.nii.gz"
    target.write_bytes(b"previous")

    class BrokenWriter:
        def SetFileName(self, name):
            self.name = name

        def SetUseCompression(self, flag):
            pass

        def Execute(self, image):
            Path(self.name).write_bytes(b"half")  # a partial file, then a crash
            raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "ImageFileWriter", BrokenWriter)
    with pytest.raises(OSError, match="disk full"):
        write_mask(np.ones((3, 4, 5), np.uint8), img, target)
    assert target.read_bytes() == b"previous"
    _assert_no_leftovers(tmp_path, {"m.nii.gz"})


def test_write_mask_label_dtypes(tmp_path):
    img = _small_volume()
    m = np.zeros((3, 4, 5), np.int64)
    m[0, 0, 0] = 300
    out = write_mask(m, img, tmp_path / "m.nii.gz")
    assert np.asarray(nib.load(str(out)).dataobj).dtype == np.uint16
    out = write_mask(m.astype(bool), img, tmp_path / "b.nii.gz")
    assert np.asarray(nib.load(str(out)).dataobj).dtype == np.uint8
    with pytest.raises(ValueError, match=">= 0"):
        write_mask(-m, img, tmp_path / "neg.nii.gz")


# ----------------------------------------------------------------- type / geometry
def test_medical_image_conventions():
    vol = _small_volume()
    assert vol.is_volume and vol.ndim_spatial == 3 and vol.spatial_shape == (3, 4, 5)
    assert vol.spacing_xyz == SPACING and vol.spacing_zyx == SPACING[::-1]
    assert vol.array_spacing == vol.spacing_zyx and vol.size_xyz == (5, 4, 3)
    # index (i, j, k) = (1, 0, 0) moves one x-spacing along the first direction column
    p = vol.affine_lps @ np.array([1, 0, 0, 1.0])
    np.testing.assert_allclose(p[:3], np.asarray(ORIGIN) + DIRECTION[:, 0] * SPACING[0])

    rgb = MedicalImage(np.zeros((4, 5, 3), np.uint8), (1, 1), (0, 0), np.eye(2), is_color=True)
    assert rgb.is_color and not rgb.is_volume and rgb.spatial_shape == (4, 5)

    with pytest.raises(ValueError, match="spacing"):
        MedicalImage(np.zeros((3, 4, 5)), (1.0, 1.0), (0, 0), np.eye(2))
    with pytest.raises(ValueError, match="positive"):
        MedicalImage(np.zeros((3, 4)), (1.0, 0.0), (0, 0), np.eye(2))
    with pytest.raises(ValueError, match="colour"):
        MedicalImage(np.zeros((3, 4)), (1.0, 1.0), (0, 0), np.eye(2), is_color=True)

    seg = vol.with_array(np.ones((3, 4, 5), np.uint8))
    check_same_geometry(seg, vol)
    with pytest.raises(ValueError, match="spatial shape"):
        vol.with_array(np.ones((5, 4, 3)))


def test_check_same_geometry_names_differences():
    a = _small_volume()
    b = MedicalImage(np.zeros((3, 4, 6)), (0.8, 0.65, 3.0), (0, 0, 0), np.eye(3))
    with pytest.raises(ValueError) as info:
        check_same_geometry(a, b)
    msg = str(info.value)
    for word in ("shape", "spacing", "origin", "direction"):
        assert word in msg
    c = MedicalImage(np.zeros((3, 4, 5)), SPACING, np.asarray(ORIGIN) + 5e-5, DIRECTION)
    check_same_geometry(a, c)  # within atol
    with pytest.raises(ValueError, match="origin"):
        check_same_geometry(a, c, atol=1e-6)


def test_truncated_nifti_gz_refused(tmp_path):
    src = tmp_path / "full.nii.gz"
    _write_nifti_source(src, np.random.default_rng(0).integers(0, 999, (20, 30, 40)).astype(np.int16))
    raw = src.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz.*(truncated|corrupt)"):
        read_image(cut)
