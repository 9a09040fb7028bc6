"""Conversion between ``SimpleITK.Image`` and :class:`MedicalImage` (internal)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageReadError
from .image import MedicalImage


def short_reason(exc: BaseException) -> str:
    """One readable line out of a (possibly multi-line) SimpleITK/ITK exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    if not lines:
        return type(exc).__name__
    for n, ln in enumerate(lines):
        m = re.search(r"ERROR:\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?(.*)", ln)
        if m:
            reason = m.group(1).strip()
            if n + 1 < len(lines):  # library detail (e.g. the NRRD parser's last complaint)
                reason = f"{reason} {lines[-1].lstrip('[').split('] ', 1)[-1]}"
            return reason[:300]
    return lines[0][:300]


def _drop_trailing_singletons(img: sitk.Image, path: Path) -> sitk.Image:
    """4D images with a singleton 4th axis are 3D; anything else 4D+ is refused."""
    dim = img.GetDimension()
    if dim <= 3:
        return img
    size = list(img.GetSize())
    if dim == 4 and size[3] == 1:
        return sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])
    raise ImageReadError(
        f"{path}: {dim}D image of size {tuple(size)} (x, y, z, ...) is not supported; "
        "only 2D images and 3D volumes can be read (extract one 3D volume first)"
    )


def from_sitk(
    img: sitk.Image,
    path: Path,
    source_format: str,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    source_files: tuple[str, ...] = (),
) -> MedicalImage:
    """Convert a SimpleITK image to :class:`MedicalImage`, refusing 4D / vector data."""
    img = _drop_trailing_singletons(img, path)
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise ImageReadError(f"{path}: {dim}D images are not supported")
    size = img.GetSize()
    ncomp = img.GetNumberOfComponentsPerPixel()
    one_slice = dim == 3 and size[2] == 1
    is_color = False
    if ncomp > 1:
        if ncomp in (3, 4) and (dim == 2 or one_slice):
            is_color = True
        else:
            raise ImageReadError(
                f"{path}: image with {ncomp} components per voxel "
                f"(size {tuple(size)}) is not supported; only scalar volumes and "
                "2D RGB/RGBA images can be read"
            )
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c]) or (y, x[, c])
    if one_slice:
        arr = arr[0]
    if is_color and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    arr = np.ascontiguousarray(arr)
    return MedicalImage(
        array=arr,
        spacing=img.GetSpacing(),
        origin=img.GetOrigin(),
        direction=np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim),
        is_color=is_color,
        source_path=path,
        source_format=source_format,
        series_uid=series_uid,
        modality=modality,
        source_files=source_files,
    )


def to_sitk(array: np.ndarray, like: MedicalImage) -> sitk.Image:
    """A scalar SimpleITK image holding ``array`` (``like.spatial_shape``) with ``like``'s geometry."""
    arr = np.ascontiguousarray(array)
    if like.geometry_ndim == 3 and arr.ndim == 2:
        arr = arr[None]  # one-slice image back to its 3D container
    img = sitk.GetImageFromArray(arr, isVector=False)
    img.SetSpacing([float(s) for s in like.spacing])
    img.SetOrigin([float(o) for o in like.origin])
    img.SetDirection([float(d) for d in like.direction.reshape(-1)])
    return img
