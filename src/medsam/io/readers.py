"""``read_image``: one entry point for every supported medical image format.

Supported inputs (see :mod:`medsam.io.image` for axis conventions):

* NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
  (``.mha``, ``.mhd``) through SimpleITK, geometry kept;
* a folder holding a DICOM series (``series_uid`` picks one of several);
* a single DICOM file (``.dcm``, ``.dicom``, ``.ima`` or any file with the
  DICM preamble): one frame -> 2D image, multi-frame -> volume;
* PNG / JPEG / BMP through Pillow: grey ``(H, W)`` or RGB ``(H, W, 3)``
  (alpha dropped, palettes expanded), unit spacing;
* TIFF through tifffile: one page -> 2D image (grey or RGB), several pages
  -> ``(Z, Y, X)`` stack; ImageJ spacing metadata is used when present.

3D files with a singleton third axis become 2D images that keep their 3D
geometry. 4D data, and vector data that is not 2D colour, are refused.
Unreadable files raise :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ImageReadError
from .formats import format_of, known_suffixes
from .image import MedicalImage

__all__ = ["read_image"]


def read_image(path: str | Path, series_uid: str | None = None) -> MedicalImage:
    """Read a 2D image or a 3D volume with its geometry.

    Parameters
    ----------
    path:
        Image file, or a folder holding a DICOM series.
    series_uid:
        For a DICOM folder with several series: the SeriesInstanceUID to read.
        Ignored (must be ``None`` or match) for other inputs.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ImageReadError
        Unknown format, corrupt file, 4D or non-colour vector data, ambiguous
        DICOM folder.
    """
    # SimpleITK and pydicom are imported when a format needs them (a PNG needs neither).
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        from .dicom import read_dicom_series

        return read_dicom_series(path, series_uid=series_uid)
    fmt = format_of(path)
    if fmt is None:
        from .dicom import is_dicom_file

        if is_dicom_file(path):
            fmt = "dicom"
    if fmt == "dicom":
        from .dicom import read_dicom_file

        image = read_dicom_file(path)
        if series_uid is not None and image.series_uid != series_uid:
            raise ImageReadError(f"{path}: file belongs to series {image.series_uid}, not {series_uid}")
        return image
    if series_uid is not None:
        raise ValueError(f"{path}: series_uid is only meaningful for DICOM input")
    if fmt in ("nifti", "nrrd", "metaimage"):
        return _read_itk(path, fmt)
    if fmt in ("png", "jpeg", "bmp"):
        return _read_pillow(path, fmt)
    if fmt == "tiff":
        return _read_tiff(path)
    if fmt == "npz":
        raise ImageReadError(f"{path}: .npz challenge files hold images and prompts; use medsam.io.read_npz_case")
    raise ImageReadError(
        f"{path}: unknown image format; supported: {known_suffixes()}, DICOM files and DICOM series folders"
    )


def _read_itk(path: Path, fmt: str) -> MedicalImage:
    import SimpleITK as sitk

    from ._sitk import from_sitk, short_reason

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(
            f"{path}: cannot read {fmt} file: corrupt, truncated or unsupported ({short_reason(exc)})"
        ) from exc
    if fmt == "nifti":
        _check_nifti_complete(path)
    return from_sitk(img, path, fmt)


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI: ITK's NIfTI reader zero-fills missing data without an error."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        expected = (
            int(header.get_data_offset())
            + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
        )
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot parse the NIfTI header ({exc})") from exc
    if path.name.lower().endswith(".gz"):
        got = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    got += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise ImageReadError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    else:
        got = path.stat().st_size
    if got < expected:
        raise ImageReadError(f"{path}: truncated NIfTI file, {got} bytes of data where the header needs {expected}")


def _unit_geometry(ndim_spatial: int, spacing=None) -> dict:
    """Geometry for formats without one: unit (or ImageJ) spacing, zero origin, identity."""
    spacing = spacing if spacing is not None else (1.0,) * ndim_spatial
    return dict(spacing=spacing, origin=(0.0,) * ndim_spatial, direction=np.eye(ndim_spatial))


def _read_pillow(path: Path, fmt: str) -> MedicalImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                raise ImageReadError(f"{path}: animated/multi-frame {fmt} files are not supported")
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("1", "LA", "La"):
                im = im.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "PA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: cannot read {fmt} file ({exc})") from exc
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[-1] != 3:
            raise ImageReadError(f"{path}: unexpected {arr.shape[-1]}-channel image")
        is_color = True
    else:
        is_color = False
    arr = np.ascontiguousarray(arr)
    return MedicalImage(
        array=arr,
        is_color=is_color,
        source_path=path,
        source_format=fmt,
        **_unit_geometry(2),
    )


def _imagej_spacing(tf, ndim_spatial: int):
    """(x, y[, z]) spacing from ImageJ metadata and resolution tags, else ``None``."""
    meta = tf.imagej_metadata if tf.is_imagej else None
    if not meta:
        return None
    try:
        page = tf.pages[0]
        sx = sy = 1.0
        xres = page.tags.get("XResolution")
        yres = page.tags.get("YResolution")
        if xres is not None:
            num, den = xres.value
            sx = den / num if num else 1.0
        if yres is not None:
            num, den = yres.value
            sy = den / num if num else 1.0
        if ndim_spatial == 2:
            return (float(sx), float(sy))
        sz = float(meta.get("spacing", 1.0))
        return (float(sx), float(sy), sz)
    except (TypeError, ValueError, ZeroDivisionError, KeyError):
        return None


def _read_tiff(path: Path) -> MedicalImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise ImageReadError(f"{path}: TIFF file holds no image series")
            series = tf.series[0]
            arr = series.asarray()
            axes = series.axes
            photometric = tf.pages[0].photometric
            is_rgb = (
                "S" in axes
                and arr.shape[-1] in (3, 4)
                and photometric is not None
                and (photometric.name in ("RGB", "YCBCR"))
            )
            if photometric is not None and photometric.name == "PALETTE":
                raise ImageReadError(f"{path}: palette TIFFs are not supported; convert to RGB")
            # squeeze singleton non-image axes (e.g. ImageJ 'TZCYX' with T=C=1)
            keep = [i for i, (ax, n) in enumerate(zip(axes, arr.shape)) if n > 1 or ax in "YX"]
            arr = arr.reshape([arr.shape[i] for i in keep])
            axes = "".join(axes[i] for i in keep)
            if is_rgb:
                if arr.ndim != 3:
                    raise ImageReadError(
                        f"{path}: colour TIFF stack of shape {arr.shape} ({axes}) is not supported; "
                        "only single 2D colour pages can be read"
                    )
                arr = arr[..., :3]
                nd = 2
            else:
                if "S" in axes and arr.shape[axes.index("S")] > 1:
                    raise ImageReadError(
                        f"{path}: TIFF with {arr.shape[axes.index('S')]} samples per pixel "
                        "that are not RGB is not supported"
                    )
                if arr.ndim not in (2, 3):
                    raise ImageReadError(
                        f"{path}: TIFF data of shape {arr.shape} (axes {axes}) is 4D or more; "
                        "only 2D pages and (Z, Y, X) stacks are supported"
                    )
                nd = arr.ndim
            spacing = _imagej_spacing(tf, nd)
    except ImageReadError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
        raise ImageReadError(f"{path}: cannot read TIFF file ({exc})") from exc
    arr = np.ascontiguousarray(arr)
    return MedicalImage(
        array=arr,
        is_color=is_rgb,
        source_path=path,
        source_format="tiff",
        **_unit_geometry(nd, spacing),
    )
