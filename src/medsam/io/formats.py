"""File-name based format detection shared by readers and writers (internal)."""

from __future__ import annotations

from pathlib import Path

# suffix (lower case, longest first where it matters) -> format name
_SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npz": "npz",
}

ITK_FORMATS = frozenset({"nifti", "nrrd", "metaimage"})
# Formats a label mask is written in (medsam.io.write_mask); PNG holds 2D masks only.
MASK_FORMATS = ITK_FORMATS | {"png", "tiff"}
MASK_SUFFIXES = ".nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .png (2D), .tif/.tiff"


def image_suffix(path: str | Path) -> str | None:
    """The image-format suffix ``path``'s name ends with, as written there (``.nii.gz`` before
    ``.nii``), or None; ``.npz`` challenge cases are not images."""
    name = Path(path).name
    low = name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix) and _SUFFIXES[suffix] != "npz":
            return name[len(name) - len(suffix) :]
    return None


def format_of(path: str | Path) -> str | None:
    """Format name for ``path`` from its suffix, or ``None`` if unknown."""
    name = Path(path).name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def known_suffixes() -> str:
    return ", ".join(_SUFFIXES)


def check_mask_path(path: str | Path, volume: bool | None = None, dicom_source: bool = False) -> str:
    """The mask format of ``path`` (from its suffix); ValueError for a suffix no mask is written as.

    ``volume``: when known, a PNG output for a volume is refused too. ``dicom_source``: the input
    is DICOM, so a ``.dcm`` output means a DICOM-SEG object referencing it (format
    ``"dicom-seg"``). Cheap (no file access), so commands check their outputs before any model runs.
    """
    fmt = format_of(path)
    name = Path(path).name
    if fmt == "dicom":
        if dicom_source:
            return "dicom-seg"
        raise ValueError(
            f"{name}: a .dcm output is a DICOM-SEG object, which references a DICOM input; for this "
            "input write a .nii.gz (or .nrrd, .mha, .png for 2D)"
        )
    if fmt in ("jpeg", "bmp"):
        raise ValueError(f"{name}: {fmt} is not a mask format (lossy or 8-bit only); use .png")
    if fmt not in MASK_FORMATS:
        raise ValueError(f"{name}: unknown mask format; use one of {MASK_SUFFIXES}")
    if fmt == "png" and volume:
        raise ValueError(f"{name}: PNG holds 2D masks only; write a volume as .nii.gz, .nrrd or .mha")
    return fmt


def check_segment_paths(
    input_path: str | Path, output_path: str | Path, overlay_path: str | Path | None = None
) -> None:
    """The paths of one segmentation, judged without reading a file: the input exists, the output
    is written in a mask format (an ``.npz`` case's output is ``.npz``), an overlay is a PNG.
    Raises FileNotFoundError or ValueError."""
    source = Path(input_path)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if overlay_path is not None and not str(overlay_path).lower().endswith(".png"):
        raise ValueError(f"the overlay is written as PNG: give a .png name, got {overlay_path}")
    from .video import check_video_output, is_video

    if is_video(source):
        check_video_output(output_path)
    elif format_of(source) == "npz":
        if format_of(output_path) != "npz":
            raise ValueError("the output of an npz case must be an .npz file (key 'segs')")
    else:
        check_mask_path(output_path, dicom_source=is_dicom_source(source))


def is_dicom_source(path: str | Path) -> bool:
    """Whether ``path`` is read as DICOM (a DICOM file, or a folder: a series)."""
    return format_of(path) == "dicom" or Path(path).is_dir()
