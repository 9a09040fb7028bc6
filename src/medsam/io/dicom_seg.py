"""DICOM-SEG output through highdicom (optional dependency: ``pip install highdicom``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import __version__
from .atomic import atomic_output
from .dicom_refs import PATIENT_STUDY_ATTRIBUTES, referenced_headers, referenced_labels
from .image import MedicalImage

__all__ = ["write_dicom_seg"]


def _display_colour(hd, rgb: tuple[int, int, int] | None) -> dict:
    """``display_color`` for a segment (the recommended CIELab display value), where this
    highdicom can convert an RGB colour; nothing otherwise."""
    convert = getattr(getattr(hd, "color", None), "CIELabColor", None)
    if rgb is None or convert is None or not hasattr(convert, "from_rgb"):
        return {}
    return {"display_color": convert.from_rgb(*(int(c) for c in rgb))}


def write_dicom_seg(
    mask,
    like: MedicalImage,
    path: str | Path,
    segment_labels: Mapping[int, str] | None = None,
    *,
    series_description: str = "MedSAM segmentation",
    colours: Mapping[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write ``mask`` as a binary DICOM Segmentation object referencing ``like``'s DICOM files.

    ``like`` must come from :func:`read_image` on a DICOM series or file (it
    needs ``like.source_files``, still present on disk); ``mask`` has
    ``like.spatial_shape`` and ``mask[k]`` annotates ``like.source_files[k]``.
    Every label ``n > 0`` present becomes segment ``n`` (named from
    ``segment_labels`` or ``"label n"``), marked as produced by an automatic
    algorithm ("MedSAM"). The segmented property is coded generically as
    SNOMED CT "Tissue"; edit the result if a precise code is needed.

    Requires the optional dependency ``highdicom``. Writing is atomic.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("write_dicom_seg needs highdicom: pip install highdicom") from exc

    path = Path(path)
    frames, present = referenced_labels(mask, like, "DICOM-SEG")
    if present != list(range(1, present[-1] + 1)):
        # DICOM segment numbers must be 1..N without gaps
        remap = np.zeros(present[-1] + 1, dtype=np.uint16)
        remap[present] = np.arange(1, len(present) + 1)
        frames = remap[frames]
    sources = referenced_headers(like, frames.shape[0], multiframe=True)
    for ds in sources:  # anonymised data often lacks these type-2 (may be empty) attributes
        for keyword in PATIENT_STUDY_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
    names = dict(segment_labels or {})
    colours = dict(colours or {})
    algorithm = hd.AlgorithmIdentificationSequence(
        name="MedSAM", family=codes.DCM.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=str(names.get(label, f"label {label}"))[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            **_display_colour(hd, colours.get(label)),
        )
        for i, label in enumerate(present)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint16 if len(present) > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medsam",
        manufacturer_model_name="MedSAM",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
    )
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return path
