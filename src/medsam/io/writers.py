"""``write_mask``: write a label array with exactly the geometry of its source image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ._sitk import short_reason, to_sitk
from .atomic import atomic_output
from .formats import ITK_FORMATS, format_of
from .image import MedicalImage

__all__ = ["write_mask"]

_MASK_SUFFIXES = ".nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .png (2D), .tif/.tiff"


def _label_array(mask, like: MedicalImage) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(
            f"mask must be an integer (or bool) label array, got dtype {mask.dtype}; "
            "threshold or round it first"
        )
    if tuple(mask.shape) != like.spatial_shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the image's spatial shape "
            f"{like.spatial_shape} (array order {'(Z, Y, X)' if like.is_volume else '(H, W)'})"
        )
    if mask.size and mask.min() < 0:
        raise ValueError(f"mask labels must be >= 0, got minimum {mask.min()}")
    top = int(mask.max()) if mask.size else 0
    if top <= np.iinfo(np.uint8).max:
        return mask.astype(np.uint8)
    if top <= np.iinfo(np.uint16).max:
        return mask.astype(np.uint16)
    if top <= np.iinfo(np.uint32).max:
        return mask.astype(np.uint32)
    raise ValueError(f"mask label {top} does not fit in uint32")


def write_mask(mask, like: MedicalImage, path: str | Path) -> Path:
    """Write an integer label array with ``like``'s geometry; returns the path written.

    ``mask`` must have ``like.spatial_shape`` (``(Z, Y, X)`` or ``(H, W)``).
    Labels are stored as uint8 when they are all <= 255, else uint16 (uint32
    for the ITK formats beyond 65535).

    The format follows the suffix of ``path``:

    * ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` - through
      SimpleITK, with ``like``'s spacing, origin and direction (NIfTI qform and
      sform both carry the source affine); use these for volumes and for
      DICOM sources;
    * ``.png`` - 2D only; ``.tif``/``.tiff`` - 2D page or ``(Z, Y, X)`` stack
      (these formats carry no geometry).

    ``.dcm`` is refused (write NIfTI, or DICOM-SEG with
    :func:`medsam.io.write_dicom_seg`); lossy formats are refused.
    Writing is atomic: a failure leaves nothing half-written (a file already at
    ``path`` stays as it was).
    """
    path = Path(path)
    labels = _label_array(mask, like)
    fmt = format_of(path)
    if fmt == "dicom":
        raise ValueError(
            f"{path}: masks are not written as plain DICOM images; write "
            f"{path.with_suffix('.nii.gz').name} (NIfTI keeps the series geometry) "
            "or use medsam.io.write_dicom_seg for a DICOM-SEG object"
        )
    if fmt in ITK_FORMATS:
        img = to_sitk(labels, like)
        with atomic_output(path) as tmp:
            writer = sitk.ImageFileWriter()
            writer.SetFileName(str(tmp))
            writer.SetUseCompression(True)
            try:
                writer.Execute(img)
            except RuntimeError as exc:
                raise OSError(f"{path}: cannot write mask ({short_reason(exc)})") from exc
        return path
    if fmt == "png":
        if like.is_volume:
            raise ValueError(f"{path}: PNG holds 2D masks only; write a volume as .nii.gz, .nrrd or .mha")
        if labels.dtype == np.uint32:
            raise ValueError(f"{path}: labels above 65535 do not fit in a PNG; use .nii.gz or .tif")
        from PIL import Image

        with atomic_output(path) as tmp:
            Image.fromarray(labels).save(tmp, format="PNG")
        return path
    if fmt == "tiff":
        import tifffile

        with atomic_output(path) as tmp:
            tifffile.imwrite(
                tmp,
                labels,
                photometric="minisblack",
                compression="zlib",
                metadata={"axes": "ZYX" if labels.ndim == 3 else "YX"},
            )
        return path
    if fmt in ("jpeg", "bmp"):
        raise ValueError(f"{path}: {fmt} is not a mask format (lossy or 8-bit only); use .png")
    raise ValueError(f"{path}: unknown mask format; use one of {_MASK_SUFFIXES}")
