"""``medsam segment --auto``: automatic mode on a file (:mod:`medsam.automatic` for the method).

A 2D image: every object, or the model's outline of each piece of a proposal label map (a file,
an array, or a specialist's prediction). A volume: every object of the key slice propagated
through the volume, or each 3D piece of a proposal label map segmented from its 3D box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import MedicalImage, read_image
from .io.formats import check_mask_path
from .predictor import Predictor
from .segment_io import (
    SegmentationOutput,
    SegmentOptions,
    embedding_cache,
    model_description,
    not_constant,
    resolve_model,
    to_model_input,
    write_outputs,
)

if TYPE_CHECKING:  # pragma: no cover
    from .automatic import AutoOptions
    from .model.sam import MedSAMModel
    from .model.sam2 import SAM2Model
    from .volume import Box2D, Box3D

__all__ = ["segment_auto"]


def segment_auto(
    image: MedicalImage,
    output_path: Path,
    opts: SegmentOptions,
    auto: AutoOptions,
    log: Callable[[str], None],
) -> SegmentationOutput:
    """Automatic mode on a 2D image, or on a volume's key slice followed by propagation."""
    from .automatic import generate_masks, instance_label_map

    if image.is_volume:
        if image.is_color:
            raise ValueError("colour volumes are not supported")
        check_mask_path(output_path, volume=True, dicom_source=image.source_format in ("dicom", "dicom-series"))
        depth = image.spatial_shape[0]
        key = depth // 2 if opts.key_slice is None else opts.key_slice
        if not 0 <= key < depth:
            raise ValueError(f"--slice {key} lies outside the volume's {depth} slices")
    elif opts.key_slice is not None:
        raise ValueError("--slice only applies to volumes; the input is a 2D image")
    pixels = not_constant(to_model_input(image, opts.modality, opts.window), image)
    model = resolve_model(opts, log)
    predictor = Predictor(model, contract=opts.contract)
    plane = pixels[key] if image.is_volume else pixels
    proposals = _proposals(image, plane, opts)
    if proposals is not None and image.is_volume:
        return _segment_volume_proposals(image, pixels, proposals, output_path, opts, model, predictor, log)
    if proposals is not None:
        from .automatic import refine_proposals

        found = refine_proposals(predictor, plane, proposals)
    else:
        found = generate_masks(predictor, plane, auto)
    log(f"automatic mode: {len(found)} objects" + (f" on slice {key}" if image.is_volume else ""))
    report: dict[str, Any] = {
        "input": str(image.source_path),
        "mode": "auto",
        "model": model_description(model, opts.checkpoint),
        "contract": predictor.contract.name,
        "proposals": _proposal_source(opts),
        "objects": [{"label": i + 1, **m.record()} for i, m in enumerate(found)],
    }
    if not image.is_volume:
        labels = instance_label_map(found, plane.shape[:2])
        written = write_outputs(
            image,
            labels,
            output_path,
            opts.overlay_path,
            opts.scores_path,
            report,
            overlay_source=pixels,
            rtstruct_path=opts.rtstruct_path,
        )
        return SegmentationOutput(*written, labels=labels, scores=[m.predicted_iou for m in found], extra=report)
    from .volume import Box2D

    report["key_slice"] = key
    prompts = [
        Box2D(m.bbox[0], m.bbox[1], m.bbox[0] + m.bbox[2], m.bbox[1] + m.bbox[3], slice=key) for m in found if m.area
    ]
    if len(prompts) != len(found):  # an empty mask has no box to propagate
        found = [m for m in found if m.area]
        report["objects"] = [{"label": i + 1, **m.record()} for i, m in enumerate(found)]
    labels = _walk(model, predictor, pixels, prompts, opts)
    written = write_outputs(
        image, labels, output_path, None, opts.scores_path, report, rtstruct_path=opts.rtstruct_path
    )
    if opts.overlay_path is not None:
        from .overlay import render_overlay, save_png
        from .preprocess import to_rgb_uint8

        save_png(render_overlay(to_rgb_uint8(pixels[key]), labels[key]), opts.overlay_path)
        written = (written[0], written[1], Path(opts.overlay_path))
    return SegmentationOutput(*written, labels=labels, scores=[m.predicted_iou for m in found], extra=report)


def _walk(
    model: MedSAMModel | SAM2Model,
    predictor: Predictor,
    pixels: np.ndarray,
    prompts: Sequence[Box2D | Box3D],
    opts: SegmentOptions,
) -> np.ndarray:
    """The volume's label map from ``prompts``: SAM2 memory tracking for SAM2-family models, the
    box walk (:func:`medsam.volume.segment_volume`) for the others; zeros without prompts."""
    from .model.sam2 import SAM2Model
    from .volume import segment_volume

    if not prompts:
        return np.zeros(pixels.shape[:3], dtype=np.uint8)
    if isinstance(model, SAM2Model):
        from .tracking import track_volume

        return track_volume(model, pixels, prompts, contract=opts.contract).labels
    cache = embedding_cache(opts)
    return segment_volume(predictor, pixels, prompts, iou_threshold=opts.iou_threshold, cache=cache).labels


def _proposal_source(opts: SegmentOptions) -> str | None:
    if opts.specialist is not None:
        return f"specialist {opts.specialist}"
    if isinstance(opts.proposals, (str, Path)):
        return str(opts.proposals)
    return None if opts.proposals is None else "array"


def _proposals(image: MedicalImage, plane: np.ndarray, opts: SegmentOptions) -> np.ndarray | None:
    """The proposal label map (on the input's grid), from ``proposals`` or ``specialist``."""
    if opts.proposals is not None and opts.specialist is not None:
        raise ValueError("give proposals or a specialist, not both")
    if opts.specialist is not None:
        if image.is_volume:
            raise ValueError(
                "specialist proposals are made for 2D images; for a volume pass its label map as proposals"
            )
        from .specialist import load_specialist

        specialist = load_specialist(opts.specialist)
        spacing = tuple(float(v) for v in image.spacing_zyx[-2:])
        return specialist.predict(plane, spacing=spacing)
    if opts.proposals is None:
        return None
    labels = read_image(opts.proposals).array if isinstance(opts.proposals, (str, Path)) else np.asarray(opts.proposals)
    if labels.shape != image.spatial_shape:
        raise ValueError(f"the proposals' shape {labels.shape} differs from the image's {image.spatial_shape}")
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.floating):  # label NIfTIs are often stored as floats
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise ValueError("proposals must be a label map of whole numbers")
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"proposals must be an integer label map, got {labels.dtype}")
    return labels


def _segment_volume_proposals(
    image: MedicalImage,
    pixels: np.ndarray,
    proposals: np.ndarray,
    output_path: Path,
    opts: SegmentOptions,
    model: MedSAMModel | SAM2Model,
    predictor: Predictor,
    log: Callable[[str], None],
) -> SegmentationOutput:
    """Each 3D connected piece of each proposal label, segmented from its 3D box."""
    from scipy import ndimage

    from .volume import Box3D

    prompts: list[Box3D] = []
    objects: list[dict[str, Any]] = []
    for value in np.unique(proposals):
        if value == 0:
            continue
        pieces, _ = ndimage.label(proposals == value)
        for index, where in enumerate(ndimage.find_objects(pieces), start=1):
            if where is None or np.count_nonzero(pieces[where] == index) < 10:
                continue
            z, y, x = where
            corners = [x.start, y.start, z.start, x.stop - 1, y.stop - 1, z.stop - 1]
            prompts.append(Box3D(*corners))
            objects.append({"label": len(prompts), "proposal_label": int(value), "box": corners})
    log(f"automatic mode: {len(prompts)} proposed objects")
    labels = _walk(model, predictor, pixels, prompts, opts)
    report = {
        "input": str(image.source_path),
        "mode": "auto",
        "model": model_description(model, opts.checkpoint),
        "contract": predictor.contract.name,
        "proposals": _proposal_source(opts),
        "objects": objects,
    }
    written = write_outputs(
        image, labels, output_path, None, opts.scores_path, report, rtstruct_path=opts.rtstruct_path
    )
    return SegmentationOutput(*written, labels=labels, scores=[], extra=report)
