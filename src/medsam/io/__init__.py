"""Medical image input/output that keeps geometry.

Arrays are ``(Z, Y, X)`` for volumes and ``(H, W[, C])`` for 2D images
(SimpleITK order, the file's ``(i, j, k)`` index reversed); ``spacing``,
``origin`` and ``direction`` are in ITK physical ``(x, y, z)`` order (LPS).
Use ``MedicalImage.spacing_zyx`` for a spacing in array order. See
:mod:`medsam.io.image` for the full statement.
"""

from .dicom import SeriesInfo, list_dicom_series
from .dicom_seg import write_dicom_seg
from .errors import ImageReadError
from .image import MedicalImage, check_same_geometry
from .npz import NpzCase, read_npz_case, write_npz_segs
from .readers import read_image
from .writers import write_mask

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
]
