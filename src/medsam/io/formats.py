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


def format_of(path: str | Path) -> str | None:
    """Format name for ``path`` from its suffix, or ``None`` if unknown."""
    name = Path(path).name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def known_suffixes() -> str:
    return ", ".join(_SUFFIXES)
