"""What a derived DICOM object (DICOM-SEG, RTSTRUCT) needs of the image it references.

Both writers (:mod:`medsam.io.dicom_seg`, :mod:`medsam.io.rtstruct`) take a label map and the
:class:`MedicalImage` it was made on; this module checks that the image came from DICOM files that
are still there and reads their headers, and checks the label map against the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .image import MedicalImage
from .writers import label_array

__all__ = ["PATIENT_STUDY_ATTRIBUTES", "referenced_headers", "referenced_labels"]

# The patient and study attributes a derived object carries over from the images it references
# (type 2 in both IODs: present, possibly empty).
PATIENT_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def referenced_labels(mask: np.ndarray, like: MedicalImage, what: str) -> tuple[np.ndarray, list[int]]:
    """``((K, H, W) labels, the labels > 0 present)`` of ``mask`` on ``like`` (a 2D image is one
    slice). ValueError when ``like`` was not read from DICOM or the mask is empty; ``what`` names
    the object being written."""
    if like.source_format not in ("dicom", "dicom-series") or not like.source_files:
        raise ValueError(
            f"a {what} references DICOM instances: the image must be read from DICOM, this one is "
            f"{like.source_format or 'in-memory'} (write NIfTI with write_mask instead)"
        )
    labels = label_array(mask, like)
    slices = labels[None] if labels.ndim == 2 else labels
    present = [int(v) for v in np.unique(slices) if v > 0]
    if not present:
        raise ValueError(f"mask is empty (no label > 0): a {what} needs at least one object")
    return slices, present


def referenced_headers(like: MedicalImage, n_slices: int, multiframe: bool = False) -> list[Dataset]:
    """The headers (no pixel data) of ``like.source_files``, one per slice of the label map, or
    with ``multiframe`` one file holding all of them. FileNotFoundError when files are gone."""
    missing = [f for f in like.source_files if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"source DICOM files are gone: {missing[:3]}")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in like.source_files]
    if len(headers) != n_slices and not (multiframe and len(headers) == 1):
        raise ValueError(f"mask has {n_slices} slices but the image references {len(headers)} files")
    return headers
