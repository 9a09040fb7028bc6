"""RTSTRUCT output: a label map as an RT Structure Set referencing its DICOM series (pydicom).

Each label ``n > 0`` is one ROI (named from ``roi_names`` or ``"label n"``, coloured from
:data:`ROI_COLOURS`, generation algorithm ``AUTOMATIC``). On every slice where it is present it is
drawn as ``CLOSED_PLANAR`` contours in patient coordinates (LPS, mm): the 0.5 iso-lines of the
slice's mask (scikit-image's marching squares), which pass between pixel centres and never
through one; holes are contours of their own. A reader that fills each slice's contours with the
even-odd rule and samples pixel centres (the usual RTSTRUCT convention) gets the mask back voxel
for voxel. Each contour references its slice's SOP instance.

highdicom writes DICOM-SEG (:mod:`medsam.io.dicom_seg`) but no RT Structure Sets; rt-utils, the
common RTSTRUCT writer, pulls in the full OpenCV. The structure is written here with pydicom.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from ..overlay import PALETTE
from .atomic import atomic_output
from .dicom_refs import PATIENT_STUDY_ATTRIBUTES, referenced_headers, referenced_labels
from .image import MedicalImage

__all__ = [
    "ROI_COLOURS",
    "RT_STRUCTURE_SET_STORAGE",
    "mask_contours",
    "rtstruct_dataset",
    "save_rtstruct",
    "write_rtstruct",
]

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
# ROI display colours (RGB), cycled by label: the overlay pictures' palette.
ROI_COLOURS: tuple[tuple[int, int, int], ...] = tuple((int(r), int(g), int(b)) for r, g, b in PALETTE)
# The study and frame of reference too are copied from the source images when present.
_COPIED = ("StudyInstanceUID", *PATIENT_STUDY_ATTRIBUTES, "FrameOfReferenceUID")


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(K, 2)`` of ``(row, col)`` points around a 2D mask's pixels (0.5
    iso-lines; outer boundaries and holes alike), last point not repeating the first."""
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, dtype=np.float64), 1)
    contours = []
    for contour in find_contours(padded, 0.5):
        points = contour - 1.0  # undo the padding
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            contours.append(points)
    return contours


def write_rtstruct(
    mask: np.ndarray,
    like: MedicalImage,
    path: str | Path,
    roi_names: Mapping[int, str] | None = None,
    *,
    series_description: str = "MedSAM structures",
    colours: Mapping[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write ``mask`` as an RTSTRUCT (:func:`rtstruct_dataset` then :func:`save_rtstruct`). Atomic."""
    ds = rtstruct_dataset(mask, like, roi_names, series_description=series_description, colours=colours)
    return save_rtstruct(ds, path)


def save_rtstruct(ds: Dataset, path: str | Path) -> Path:
    """Write an RT Structure Set made by :func:`rtstruct_dataset` to ``path``, atomically."""
    path = Path(path)
    with atomic_output(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def rtstruct_dataset(
    mask: np.ndarray,
    like: MedicalImage,
    roi_names: Mapping[int, str] | None = None,
    *,
    series_description: str = "MedSAM structures",
    colours: Mapping[int, tuple[int, int, int]] | None = None,
) -> Dataset:
    """The RT Structure Set of ``mask`` (``like.spatial_shape``, labels 0..N) referencing ``like``'s
    DICOM series (``like`` must come from :func:`medsam.io.read_image` on a DICOM series or file,
    its files still on disk; ``mask[k]`` is drawn on ``like.source_files[k]``). ``colours``:
    label -> RGB display colour (default :data:`ROI_COLOURS`). Nothing is written; ValueError or
    FileNotFoundError when the mask or the series cannot be referenced."""
    slices, present = referenced_labels(mask, like, "RTSTRUCT")
    sources = referenced_headers(like, slices.shape[0])
    affine = like.affine_lps
    names = dict(roi_names or {})
    ds = _header(sources[0], series_description)
    frame_uid = str(getattr(sources[0], "FrameOfReferenceUID", "") or generate_uid())
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(frame_uid, sources)])
    rois, contours, observations = [], [], []
    for number, label in enumerate(present, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = str(names.get(label, f"label {label}"))[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        item = Dataset()
        colour = (colours or {}).get(label, ROI_COLOURS[(label - 1) % len(ROI_COLOURS)])
        item.ROIDisplayColor = [int(c) for c in colour]
        item.ReferencedROINumber = number
        item.ContourSequence = DicomSequence(
            [
                _contour(points, k, affine, sources[k], not like.is_volume)
                for k in range(slices.shape[0])
                for points in mask_contours(slices[k] == label)
            ]
        )
        contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def _header(source: Dataset, description: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = datetime.datetime.now()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = str(meta.MediaStorageSOPInstanceUID)
    ds.Modality = "RTSTRUCT"
    for keyword in _COPIED:
        setattr(ds, keyword, getattr(source, keyword, ""))
    if not ds.StudyInstanceUID:
        ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(getattr(source, "SeriesNumber", 0) or 0) + 2000
    ds.SeriesDescription = description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = "medsam"
    ds.ManufacturerModelName = "MedSAM"
    ds.StructureSetLabel = "MedSAM"
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.OperatorsName = ""
    return ds


def _referenced_frame(frame_uid: str, sources: Sequence[Dataset]) -> Dataset:
    images = []
    for s in sources:
        image = Dataset()
        image.ReferencedSOPClassUID = s.SOPClassUID
        image.ReferencedSOPInstanceUID = s.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = sources[0].SeriesInstanceUID
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as TPS use it)
    study.ReferencedSOPInstanceUID = getattr(sources[0], "StudyInstanceUID", "") or generate_uid()
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _contour(points: np.ndarray, k: int, affine: np.ndarray, source: Dataset, two_d: bool) -> Dataset:
    """One CLOSED_PLANAR contour of (row, col) points on slice ``k``, in LPS millimetres."""
    count = len(points)
    if two_d:  # a single slice: index (i, j) with the slice's own 3D geometry, if any
        index = np.stack([points[:, 1], points[:, 0], np.zeros(count), np.ones(count)])
        index = index[[0, 1, 3]] if affine.shape[0] == 3 else index
    else:
        index = np.stack([points[:, 1], points[:, 0], np.full(count, float(k)), np.ones(count)])
    world = (affine @ index)[:-1]
    if world.shape[0] == 2:  # a 2D geometry: put the plane at z = 0
        world = np.vstack([world, np.zeros(count)])
    item = Dataset()
    image = Dataset()
    image.ReferencedSOPClassUID = source.SOPClassUID
    image.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.ContourImageSequence = DicomSequence([image])
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = count
    item.ContourData = [float(f"{v:.6f}") for v in world.T.reshape(-1)]
    return item
