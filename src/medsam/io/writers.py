"""``write_mask`` (a label array) and ``write_volume`` (an image's own values), each with exactly
the geometry of its source image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .formats import ITK_FORMATS, check_mask_path
from .image import MedicalImage

__all__ = ["write_mask", "write_volume"]


def label_array(mask, like: MedicalImage) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(
            f"mask must be an integer (or bool) label array, got dtype {mask.dtype}; threshold or round it first"
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


def _write_nifti_like_source(labels: np.ndarray, like: MedicalImage, path: Path) -> bool:
    """Write ``labels`` with the header of ``like``'s NIfTI source file; False when that header is
    not available or no longer describes ``like`` (then the caller writes through SimpleITK)."""
    if like.source_format != "nifti" or like.source_path is None or like.is_color:
        return False
    try:
        import nibabel as nib

        source = nib.load(str(like.source_path))
        header = source.header.copy()
        shape = tuple(int(d) for d in header.get_data_shape())
        zooms = tuple(float(z) for z in header.get_zooms())
    except Exception:
        return False
    voxels = labels.T  # array order (z, y, x) is the file's (i, j, k) reversed
    if int(np.prod(shape)) != labels.size or tuple(d for d in shape if d != 1) != tuple(
        d for d in voxels.shape if d != 1
    ):
        return False
    if not np.allclose(zooms[: len(like.spacing)], like.spacing, rtol=1e-5, atol=1e-6):
        return False
    header.set_data_dtype(labels.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    image = nib.Nifti1Image(np.ascontiguousarray(voxels.reshape(shape)), None, header=header)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))
    return True


def write_mask(mask, like: MedicalImage, path: str | Path) -> Path:
    """Write an integer label array with ``like``'s geometry; returns the path written.

    ``mask`` must have ``like.spatial_shape`` (``(Z, Y, X)`` or ``(H, W)``).
    Labels are stored as uint8 when they are all <= 255, else uint16 (uint32
    for the ITK formats beyond 65535).

    The format follows the suffix of ``path``:

    * ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` - through
      SimpleITK, with ``like``'s spacing, origin and direction (NIfTI qform and
      sform both carry the source affine); use these for volumes and for
      DICOM sources. A NIfTI mask of a NIfTI source is written with the
      source's own header instead (nibabel): same dimensions, affine, qform and
      sform codes and units, so a 2D NIfTI keeps its slice spacing and position;
    * ``.png`` - 2D only; ``.tif``/``.tiff`` - 2D page or ``(Z, Y, X)`` stack
      (these formats carry no geometry).

    ``.dcm`` is refused (write NIfTI, or DICOM-SEG with
    :func:`medsam.io.write_dicom_seg`); lossy formats are refused.
    Writing is atomic: a failure leaves nothing half-written (a file already at
    ``path`` stays as it was).
    """
    path = Path(path)
    labels = label_array(mask, like)
    fmt = check_mask_path(path, volume=like.is_volume)
    if fmt == "nifti" and _write_nifti_like_source(labels, like, path):
        return path
    if fmt in ITK_FORMATS:
        _write_itk(labels, like, path, "mask")
        return path
    if fmt == "png":
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
    raise AssertionError(f"unhandled mask format {fmt}")  # check_mask_path admits only the above


def write_volume(image: MedicalImage, path: str | Path) -> Path:
    """Write ``image``'s own array (scalar, not colour) with its geometry as NIfTI, NRRD or
    MetaImage (from the suffix of ``path``), atomically; returns the path written. Used to hand a
    DICOM series to a viewer as one file."""
    from .formats import format_of

    path = Path(path)
    if image.is_color:
        raise ValueError("colour images are not written as volumes")
    if format_of(path) not in ITK_FORMATS:
        raise ValueError(f"{path.name}: write a volume as .nii.gz, .nii, .nrrd or .mha")
    _write_itk(np.asarray(image.array), image, path, "image")
    return path


def _write_itk(array: np.ndarray, like: MedicalImage, path: Path, what: str) -> None:
    import SimpleITK as sitk

    from ._sitk import short_reason, to_sitk

    img = to_sitk(array, like)
    with atomic_output(path) as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetUseCompression(True)
        try:
            writer.Execute(img)
        except RuntimeError as exc:
            raise OSError(f"{path}: cannot write {what} ({short_reason(exc)})") from exc
