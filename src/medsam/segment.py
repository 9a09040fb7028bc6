"""File-level segmentation: read an image, prompt the model, write mask, overlay and scores.

This is what ``medsam segment`` runs; it is an ordinary library function so that Python users
and the CLI share one path. All outputs are computed in memory first and written atomically at
the end, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .io import MedicalImage, read_image, write_mask
from .io.atomic import atomic_output
from .predictor import Predictor, masks_to_label_map, validate_boxes


@dataclass
class SegmentationOutput:
    """What :func:`segment_file` wrote and computed."""

    mask_path: Path
    scores_path: Path | None
    overlay_path: Path | None
    labels: np.ndarray
    scores: list[float]
    extra: dict = field(default_factory=dict)


def to_model_input(image: MedicalImage, modality: str | None = None, window=None) -> np.ndarray:
    """The image array as the model should see it: uint8 after modality normalisation.

    uint8 data (PNG/JPEG, curated images) are kept. Otherwise the modality (``modality`` argument,
    else the DICOM tag) decides: CT is windowed (soft tissue unless ``window`` is given), other
    modalities are percentile-clipped; with no modality known, the array is min-max scaled.
    """
    from .curate.normalize import normalize_image

    array = image.array
    if array.dtype == np.uint8 and modality is None and window is None:
        return array
    chosen = modality or image.modality
    if chosen is None:
        if window is not None:
            chosen = "CT"
        else:
            return _minmax_uint8(array)
    return normalize_image(array, chosen, window=window)


def _minmax_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale a whole image or volume (all channels jointly) to uint8, rounding."""
    data = np.asarray(array, dtype=np.float64)
    if not np.isfinite(data).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((data - lo) * scale).astype(np.uint8)


def parse_boxes(values: Sequence[Sequence[float]], width: int) -> np.ndarray:
    boxes = np.asarray(values, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != width:
        raise ValueError(f"each box needs {width} numbers")
    return boxes


def segment_file(
    input_path: str | Path,
    output_path: str | Path,
    boxes: Sequence[Sequence[float]],
    *,
    model=None,
    checkpoint: str | Path | None = None,
    overlay_path: str | Path | None = None,
    scores_path: str | Path | None = None,
    key_slice: int | None = None,
    modality: str | None = None,
    window=None,
    device: str | None = None,
    contract: str | None = None,
    series_uid: str | None = None,
    volume_options: dict | None = None,
    zoom=None,
    log: Callable[[str], None] = lambda message: None,
) -> SegmentationOutput:
    """Segment the objects given by ``boxes`` in one image file.

    2D inputs take boxes [x0, y0, x1, y1]; volumes take 3D boxes [x0, y0, z0, x1, y1, z1] or 2D
    boxes with ``key_slice``. Coordinates are pixel/voxel indices (i, j, k) as the file stores
    them, inclusive. CVPR 2024 ``.npz`` cases carry their own boxes (``boxes`` must be empty).
    One box gives a 0/1 mask, several give labels 1..N (overlaps go to the highest score).
    ``zoom`` (a :class:`medsam.zoom.ZoomPolicy`) segments small boxes on a magnified crop around
    them: in a 2D image by :func:`medsam.zoom.predict_with_zoom`, in a volume (3D boxes, or 2D
    boxes on ``key_slice``) on every slice whose propagated box is small
    (:func:`medsam.volume.segment_volume`). ``zoom="auto"`` (the command line's default): the
    default :class:`~medsam.zoom.ZoomPolicy` for 2D images and 2D ``.npz`` cases when the model's
    input is at most :data:`AUTO_ZOOM_MAX_INPUT` px (LiteMedSAM: its 64 x 64 embedding of a
    whole slice does not resolve small structures; on the held-out CT case zoom lifted the
    embedded model's DSC from 0.653 to 0.779, docs/model-card.md), no zoom otherwise and never
    in volumes (there it measured +0.017 DSC, not significant, at 12x the time).
    """
    input_path = Path(input_path)
    output_path = Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input not found: {input_path}")
    if isinstance(zoom, str) and zoom != "auto":
        raise ValueError(f"zoom must be a ZoomPolicy, None or 'auto', got {zoom!r}")
    if input_path.suffix == ".npz":
        return _segment_npz(input_path, output_path, boxes, model, checkpoint, device, contract, zoom,
                            volume_options or {}, log)

    image = read_image(input_path, series_uid=series_uid)
    if image.is_volume:
        zoom = None if zoom == "auto" else zoom
        options = dict(volume_options or {})
        if zoom is not None:
            options["zoom"] = zoom
        return _segment_volume_file(
            image, output_path, boxes, key_slice, model, checkpoint, overlay_path, scores_path,
            modality, window, device, contract, options, log,
        )
    if key_slice is not None:
        raise ValueError("--slice only applies to volumes; the input is a 2D image")
    if not boxes:
        raise ValueError("give at least one box: --box X0 Y0 X1 Y1")
    box_array = parse_boxes(boxes, 4)
    H, W = image.spatial_shape
    validate_boxes(box_array, (H, W))
    pixels = to_model_input(image, modality, window)

    model = model if model is not None else _load(checkpoint, device, contract, log)
    predictor = Predictor(model, contract=contract)
    zoom = _resolve_auto_zoom(zoom, predictor, log)
    predictor.set_image(pixels)
    if zoom is not None:
        from .zoom import predict_with_zoom

        prediction = predict_with_zoom(predictor, pixels, box_array, zoom, score_maps=len(box_array) > 1)
        log(f"zoom: {int(prediction.zoomed.sum())} of {len(box_array)} boxes segmented on a magnified crop")
        labels = prediction.masks[0].astype(np.uint8) if len(box_array) == 1 else prediction.label_map()
    elif len(box_array) == 1:
        prediction = predictor.predict(boxes=box_array)
        labels = prediction.masks[0].astype(np.uint8)
    else:
        prediction = predictor.predict(boxes=box_array)
        labels = masks_to_label_map(prediction)
    scores = [float(s) for s in prediction.scores]

    written = _write_outputs(
        image, labels, output_path, overlay_path, scores_path,
        {"input": str(input_path), "boxes": box_array.tolist(), "scores": scores,
         "model": _model_description(model, checkpoint), "contract": predictor.contract.name},
        overlay_source=pixels, overlay_boxes=box_array,
    )
    return SegmentationOutput(*written, labels=labels, scores=scores)


def _model_description(model, checkpoint) -> dict:
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "architecture": model.config.name,
        "untrained_default": bool(getattr(model, "is_untrained_default", False)),
    }


def _load(checkpoint, device, contract, log):
    import warnings

    from .default_model import UNTRAINED_WARNING
    from .weights import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(checkpoint, contract=contract, device=device)
    if any(UNTRAINED_WARNING in str(w.message) for w in caught):
        log("WARNING: " + UNTRAINED_WARNING)
    elif checkpoint is None:
        log("using the embedded default model (no --checkpoint given)")
    return model


def _write_outputs(
    image: MedicalImage,
    labels: np.ndarray,
    output_path: Path,
    overlay_path,
    scores_path,
    report: dict,
    overlay_source: np.ndarray | None = None,
    overlay_boxes: np.ndarray | None = None,
):
    """Write the mask (input geometry), the scores JSON and the optional overlay PNG."""
    from .overlay import render_overlay, save_png
    from .preprocess import to_rgb_uint8

    picture = None
    if overlay_path is not None:
        picture = render_overlay(to_rgb_uint8(overlay_source), labels, overlay_boxes)
    scores_path = Path(scores_path) if scores_path else _default_scores_path(output_path)
    write_mask(labels, image, output_path)
    with atomic_output(scores_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    if picture is not None:
        save_png(picture, overlay_path)
    return output_path, scores_path, (Path(overlay_path) if overlay_path else None)


def _default_scores_path(output_path: Path) -> Path:
    name = output_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff", ".npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output_path.with_name(name + ".scores.json")


def _segment_volume_file(image, output_path, boxes, key_slice, model, checkpoint, overlay_path,
                         scores_path, modality, window, device, contract, options, log):
    from .volume import Box2D, Box3D, segment_volume

    if not boxes:
        raise ValueError("give at least one box: --box X0 Y0 Z0 X1 Y1 Z1, or --box X0 Y0 X1 Y1 --slice K")
    if image.is_color:
        raise ValueError("colour volumes are not supported")
    Z, Y, X = image.spatial_shape
    widths = {len(b) for b in boxes}
    if widths == {6}:
        if key_slice is not None:
            raise ValueError("--slice goes with 2D boxes (X0 Y0 X1 Y1), not with 3D boxes")
        prompts = []
        for b in parse_boxes(boxes, 6):
            x0, y0, z0, x1, y1, z1 = b
            validate_boxes(np.array([[x0, y0, x1, y1]]), (Y, X))
            if not (0 <= z0 <= z1 < Z):
                raise ValueError(f"box z-range [{z0:g}, {z1:g}] lies outside the volume's {Z} slices")
            prompts.append(Box3D(*[int(round(v)) for v in b]))
    elif widths == {4}:
        if key_slice is None:
            raise ValueError("2D boxes on a volume need --slice K (or give 3D boxes X0 Y0 Z0 X1 Y1 Z1)")
        if not 0 <= key_slice < Z:
            raise ValueError(f"--slice {key_slice} lies outside the volume's {Z} slices")
        b4 = parse_boxes(boxes, 4)
        validate_boxes(b4, (Y, X))
        prompts = [Box2D(*[int(round(v)) for v in b], slice=key_slice) for b in b4]
    else:
        raise ValueError("boxes on a volume need 6 numbers (X0 Y0 Z0 X1 Y1 Z1) or 4 with --slice")
    pixels = to_model_input(image, modality, window)
    model = model if model is not None else _load(checkpoint, device, contract, log)
    predictor = Predictor(model, contract=contract)
    result = segment_volume(predictor, pixels, prompts, **options)
    if options.get("zoom") is not None:
        log(f"zoom: {sum(result.zoomed)} of {len(prompts)} objects segmented on a magnified crop "
            f"({result.crop_embeddings_computed} crop embeddings)")
    report = {
        "input": str(image.source_path), "boxes": [list(map(float, b)) for b in boxes],
        "model": _model_description(model, checkpoint), "contract": predictor.contract.name,
        "objects": [
            {"label": i + 1 if len(prompts) > 1 else 1, "slices": None if r is None else list(r),
             "stopped": {"up": up, "down": down},
             "scores": {str(k): float(v) for k, v in sorted(sc.items())}}
            for i, (r, (up, down), sc) in enumerate(zip(result.slices, result.stop_reasons, result.scores))
        ],
        "embeddings_computed": result.embeddings_computed,
        "zoomed": [bool(z) for z in result.zoomed],
        "crop_embeddings_computed": result.crop_embeddings_computed,
    }
    labels = result.labels
    if len(prompts) == 1:
        labels = (labels > 0).astype(np.uint8)
    overlay_src = None
    if overlay_path is not None:
        # Overlay of the key slice of the first object.
        k = result.key_slices[0]
        overlay_src = pixels[k]
        labels_for_overlay = labels[k]
        from .overlay import render_overlay, save_png
        from .preprocess import to_rgb_uint8

        picture = render_overlay(to_rgb_uint8(overlay_src), labels_for_overlay)
    written = _write_outputs(image, labels, output_path, None, scores_path, report)
    if overlay_path is not None:
        save_png(picture, overlay_path)
        written = (written[0], written[1], Path(overlay_path))
    return SegmentationOutput(*written, labels=labels, scores=[], extra=report)


# Largest network input side for which ``zoom="auto"`` zooms 2D boxes (LiteMedSAM's 256 px).
AUTO_ZOOM_MAX_INPUT = 256


def _resolve_auto_zoom(zoom, predictor: Predictor, log: Callable[[str], None]):
    """``zoom`` itself, or for "auto" the default ZoomPolicy when the model's input is small."""
    if zoom != "auto":
        return zoom
    if predictor.contract.input_size > AUTO_ZOOM_MAX_INPUT:
        return None
    from .zoom import ZoomPolicy

    log(f"zoom: on for this {predictor.contract.input_size} px model (small boxes on a magnified crop; "
        "--no-zoom turns it off)")
    return ZoomPolicy()


def _segment_npz(input_path, output_path, boxes, model, checkpoint, device, contract, zoom, options, log):
    from .io import read_npz_case, write_npz_segs
    from .volume import segment_npz_case

    if boxes:
        raise ValueError("an npz case carries its own boxes; do not pass --box")
    if output_path.suffix != ".npz":
        raise ValueError("the output of an npz case must be an .npz file (key 'segs')")
    case = read_npz_case(input_path)
    options = {k: v for k, v in options.items() if v is not None}
    if options and not case.is_volume:
        raise ValueError(f"{', '.join(sorted(options))} applies to 3D cases; {input_path.name} is a 2D case")
    model = model if model is not None else _load(checkpoint, device, contract, log)
    predictor = Predictor(model, contract=contract)
    zoom = None if case.is_volume and zoom == "auto" else _resolve_auto_zoom(zoom, predictor, log)
    segs = segment_npz_case(predictor, case, zoom=zoom, **options)
    write_npz_segs(output_path, segs, spacing=case.spacing)
    return SegmentationOutput(output_path, None, None, labels=segs, scores=[])
