"""Medical image input/output that keeps geometry.

Arrays are ``(Z, Y, X)`` for volumes and ``(H, W[, C])`` for 2D images
(SimpleITK order, the file's ``(i, j, k)`` index reversed); ``spacing``,
``origin`` and ``direction`` are in ITK physical ``(x, y, z)`` order (LPS).
Use ``MedicalImage.spacing_zyx`` for a spacing in array order. See
:mod:`medsam.io.image` for the full statement.
"""

import importlib
from typing import Any

# Imported on first use, so that `medsam.io.formats` or a PNG read does not load SimpleITK/pydicom.
_LAZY = {
    "SeriesInfo": "dicom",
    "list_dicom_series": "dicom",
    "write_dicom_seg": "dicom_seg",
    "ImageReadError": "errors",
    "MedicalImage": "image",
    "check_same_geometry": "image",
    "NpzCase": "npz",
    "read_npz_case": "npz",
    "write_npz_segs": "npz",
    "read_image": "readers",
    "write_mask": "writers",
    "write_volume": "writers",
}

__all__ = [
    "ImageReadError",
    "MedicalImage",
    "NpzCase",
    "SeriesInfo",
    "check_same_geometry",
    "list_dicom_series",
    "read_image",
    "read_npz_case",
    "write_dicom_seg",
    "write_mask",
    "write_npz_segs",
    "write_volume",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
