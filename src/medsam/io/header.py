"""``declared_size``: how large an image file says its pixel data is, read from the header alone.

A compressed file can declare far more data than it holds on disk (a 0.6 MB ``.nii.gz`` can
announce 600 M voxels). Servers and batch jobs call :func:`check_declared_size` before
:func:`medsam.io.read_image` so that such a file is refused before anything is decompressed.

How each format is read (never the pixel data):

* NIfTI, NRRD, MetaImage: SimpleITK's ``ImageFileReader.ReadImageInformation`` (size, components,
  pixel type);
* DICOM: pydicom with ``stop_before_pixels`` (rows, columns, frames, samples, bits allocated);
* PNG, JPEG, BMP: Pillow's lazy ``Image.open`` (size and bands); Pillow's own decompression-bomb
  guard (``Image.MAX_IMAGE_PIXELS``) stays in force when the pixels are read later;
* TIFF: tifffile's page index (the shape and dtype of the first series).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageReadError
from .formats import format_of

__all__ = ["DeclaredSize", "ImageTooLarge", "check_declared_size", "declared_size"]


@dataclass(frozen=True)
class DeclaredSize:
    """Pixel data a header announces: ``voxels`` (all axes and channels) and ``nbytes``."""

    shape: tuple[int, ...]
    voxels: int
    nbytes: int


class ImageTooLarge(ImageReadError):
    """A file whose header declares more voxels or bytes than allowed."""


def declared_size(path: str | Path) -> DeclaredSize:
    """The size of the pixel data ``path`` declares; raises :class:`ImageReadError` if the header
    cannot be read. ``path`` is a single file (a DICOM series folder: call it per file)."""
    path = Path(path)
    fmt = format_of(path)
    try:
        if fmt in ("nifti", "nrrd", "metaimage"):
            return _itk(path)
        if fmt in ("png", "jpeg", "bmp"):
            return _pillow(path)
        if fmt == "tiff":
            return _tiff(path)
        return _dicom(path)
    except ImageReadError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(f"{path}: cannot read the image header ({reason})") from None


def check_declared_size(path: str | Path, max_voxels: int | None, max_bytes: int | None) -> DeclaredSize:
    """:func:`declared_size`, raising :class:`ImageTooLarge` above either limit (``None`` = none)."""
    size = declared_size(path)
    if max_voxels is not None and size.voxels > max_voxels:
        raise ImageTooLarge(
            f"{Path(path).name}: the header declares {size.voxels:,} voxels {list(size.shape)}, "
            f"more than the limit of {max_voxels:,}"
        )
    if max_bytes is not None and size.nbytes > max_bytes:
        raise ImageTooLarge(
            f"{Path(path).name}: the header declares {size.nbytes:,} bytes of pixel data, "
            f"more than the limit of {max_bytes:,}"
        )
    return size


def _make(shape: Iterable[int], bytes_per_voxel: int) -> DeclaredSize:
    dims = tuple(int(d) for d in shape)
    voxels = 1
    for d in dims:
        if d < 0:
            raise ImageReadError(f"negative image size {list(dims)} in the header")
        voxels *= d
    return DeclaredSize(dims, voxels, voxels * int(bytes_per_voxel))


def _itk(path: Path) -> DeclaredSize:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        from ._sitk import short_reason

        raise ImageReadError(f"{path}: cannot read the image header ({short_reason(exc)})") from None
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", name)
    per_component = int(bits.group(1)) // 8 if bits else 8
    components = int(reader.GetNumberOfComponents())
    size = tuple(reader.GetSize())
    shape = size + ((components,) if components > 1 else ())
    return _make(shape, per_component)


def _pillow(path: Path) -> DeclaredSize:
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        bands = len(im.getbands())
    return _make((height, width, bands), 1 if im.mode not in ("I", "I;16", "F") else 4)


def _tiff(path: Path) -> DeclaredSize:
    import numpy as np
    import tifffile

    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            raise ImageReadError(f"{path}: TIFF without image data")
        sizes = [_make(s.shape, np.dtype(s.dtype).itemsize) for s in tf.series]
    first = sizes[0]
    return DeclaredSize(first.shape, sum(s.voxels for s in sizes), sum(s.nbytes for s in sizes))


def _dicom(path: Path) -> DeclaredSize:
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    return _make((frames, rows, cols, samples), max(1, (bits + 7) // 8))
