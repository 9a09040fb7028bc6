"""File-level segmentation: read an image, prompt the model, write mask, overlay and scores.

This is what ``medsam segment`` runs; it is an ordinary library function so that Python users
and the CLI share one path. All outputs are computed in memory first and written atomically at
the end, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .intensity import minmax_to_uint8, normalize_image
from .io import MedicalImage, read_image, write_mask
from .io.atomic import write_json
from .io.formats import check_mask_path, check_segment_paths, format_of
from .predictor import Prediction, Predictor, clip_boxes, masks_to_label_map

if TYPE_CHECKING:  # pragma: no cover
    from .model.sam import MedSAMModel
    from .model.sam2 import SAM2Model
    from .zoom import ZoomedPrediction, ZoomPolicy


@dataclass
class SegmentationOutput:
    """What :func:`segment_file` wrote and computed."""

    mask_path: Path
    scores_path: Path | None
    overlay_path: Path | None
    labels: np.ndarray
    scores: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SegmentOptions:
    """How :func:`segment_file` reads, prompts and writes (everything but the input, output and boxes).

    Attributes:
        model: a loaded model; default: ``checkpoint`` is loaded (the embedded model when None).
        checkpoint, arch, contract, device: as :func:`medsam.load_model` takes them.
        overlay_path: also write an overlay picture (PNG) here.
        scores_path: where the scores JSON goes (default: the output's stem + ``.scores.json``).
        key_slice: the slice 2D boxes on a volume are drawn on (array index ``k``).
        modality, window: model-input normalisation (:func:`to_model_input`).
        series_uid: which DICOM series of a folder holding several.
        iou_threshold: volumes: stop propagation below this predicted IoU
            (:func:`medsam.volume.segment_volume`'s default when None).
        zoom: a :class:`medsam.zoom.ZoomPolicy`, ``None`` (never), or ``"auto"``: the default
            policy for 2D images and 2D ``.npz`` cases when the model's input is at most
            :data:`AUTO_ZOOM_MAX_INPUT` px (LiteMedSAM's 64 x 64 embedding of a whole slice does not
            resolve small structures), no zoom otherwise and never in volumes (docs/model-card.md
            gives the measurements behind both choices).
    """

    model: MedSAMModel | SAM2Model | None = None
    checkpoint: str | Path | None = None
    arch: str | None = None
    contract: str | None = None
    device: str | None = None
    overlay_path: str | Path | None = None
    scores_path: str | Path | None = None
    key_slice: int | None = None
    modality: str | None = None
    window: str | tuple[float, float] | None = None
    series_uid: str | None = None
    iou_threshold: float | None = None
    zoom: ZoomPolicy | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        from .zoom import ZoomPolicy

        if not (self.zoom is None or self.zoom == "auto" or isinstance(self.zoom, ZoomPolicy)):
            raise ValueError(f"zoom must be a ZoomPolicy, None or 'auto', got {self.zoom!r}")


def to_model_input(
    image: MedicalImage, modality: str | None = None, window: str | tuple[float, float] | None = None
) -> np.ndarray:
    """The image array as the model should see it: uint8 after modality normalisation.

    uint8 data (PNG/JPEG, curated images) are kept. Otherwise the modality (``modality`` argument,
    else the DICOM tag) decides: CT is windowed (soft tissue unless ``window`` is given), other
    modalities are percentile-clipped; with no modality known, the array is min-max scaled.
    NaN and infinite voxels take the lowest finite value (with a warning); an image without any
    finite value is refused (ValueError).
    """
    array = _finite_or_refused(image.array)
    if array.dtype == np.uint8 and modality is None and window is None:
        return array
    chosen = modality or image.modality
    if chosen is None:
        if window is not None:
            chosen = "CT"
        else:
            return minmax_to_uint8(array)
    return normalize_image(array, chosen, window=window)


def _finite_or_refused(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "fc":
        return array
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise ValueError("the image has no finite value (every voxel is NaN or infinite)")
    bad = int(finite.size - np.count_nonzero(finite))
    warnings.warn(
        f"{bad} of {finite.size} voxels are NaN or infinite; they are given the lowest finite value", stacklevel=3
    )
    return np.where(finite, array, array[finite].min())


def _not_constant(pixels: np.ndarray, image: MedicalImage) -> np.ndarray:
    """``pixels``, unless the whole model input is one grey value (nothing can be segmented:
    a blank image, or one whose every voxel was NaN; ITK's NIfTI reader gives NaN as 0)."""
    if pixels.size and pixels.min() == pixels.max():
        raw = np.asarray(image.array)
        value = float(raw.flat[0]) if raw.size else 0.0
        raise ValueError(f"the image is constant (every voxel is {value:g}): there is nothing to segment")
    return pixels


def parse_boxes(values: Sequence[Sequence[float]], width: int) -> np.ndarray:
    boxes = np.asarray(values, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != width:
        raise ValueError(f"each box needs {width} numbers")
    return boxes


def _clipped(boxes: np.ndarray, size: tuple[int, int], inclusive: bool = False) -> np.ndarray:
    """Boxes clipped to the image (a warning names each one that overhung its edge); ``inclusive``
    as in :func:`medsam.predictor.clip_boxes`."""
    clipped, changed = clip_boxes(boxes, size, inclusive)
    for i in np.flatnonzero(changed):
        before = ", ".join(f"{v:g}" for v in boxes[i])
        after = ", ".join(f"{v:g}" for v in clipped[i])
        warnings.warn(f"box {i + 1} [{before}] overhangs the image edge; clipped to [{after}]", stacklevel=3)
    return clipped


def segment_file(
    input_path: str | Path,
    output_path: str | Path,
    boxes: Sequence[Sequence[float]],
    options: SegmentOptions | None = None,
    *,
    log: Callable[[str], None] = lambda message: None,
    **overrides: Any,
) -> SegmentationOutput:
    """Segment the objects given by ``boxes`` in one image file and write the mask.

    2D inputs take boxes [x0, y0, x1, y1]; volumes take 3D boxes [x0, y0, z0, x1, y1, z1] or 2D
    boxes with ``options.key_slice``. Coordinates are pixel/voxel indices (i, j, k) as the file
    stores them, inclusive; a box that overhangs the image is clipped to it (with a warning), one
    that is empty or wholly outside is refused. CVPR 2024 ``.npz`` cases carry their own boxes
    (``boxes`` must be empty). One box gives a 0/1 mask, several give labels 1..N (overlaps go
    to the highest score). ``options`` (:class:`SegmentOptions`; keyword ``overrides`` replace
    its fields, e.g. ``segment_file(a, b, boxes, zoom=None)``) say how.

    Everything that can be judged without the model (the input exists, the output's format, the
    boxes) is checked before the model is loaded; all outputs are written at the end, atomically.
    """
    opts = replace(options or SegmentOptions(), **overrides)
    input_path = Path(input_path)
    output_path = Path(output_path)
    check_segment_paths(input_path, output_path, opts.overlay_path)
    if format_of(input_path) == "npz":
        return _segment_npz(input_path, output_path, boxes, opts, log)
    image = read_image(input_path, series_uid=opts.series_uid)
    if image.is_volume:
        return _segment_volume_file(image, output_path, boxes, opts, log)
    if opts.key_slice is not None:
        raise ValueError("--slice only applies to volumes; the input is a 2D image")
    if not boxes:
        raise ValueError("give at least one box: --box X0 Y0 X1 Y1")
    box_array = _clipped(parse_boxes(boxes, 4), image.spatial_shape)
    pixels = _not_constant(to_model_input(image, opts.modality, opts.window), image)

    model = _model(opts, log)
    predictor = Predictor(model, contract=opts.contract)
    zoom = _resolve_auto_zoom(opts.zoom, predictor, log)
    prediction: ZoomedPrediction | Prediction
    if zoom is not None:
        from .zoom import predict_with_zoom

        # Embeds the whole image only if a box is too large to zoom.
        prediction = predict_with_zoom(predictor, pixels, box_array, zoom, score_maps=len(box_array) > 1)
        log(f"zoom: {int(prediction.zoomed.sum())} of {len(box_array)} boxes segmented on a magnified crop")
        labels = prediction.masks[0].astype(np.uint8) if len(box_array) == 1 else prediction.label_map()
    else:
        predictor.set_image(pixels)
        prediction = predictor.predict(boxes=box_array)
        labels = prediction.masks[0].astype(np.uint8) if len(box_array) == 1 else masks_to_label_map(prediction)
    scores = [float(s) for s in prediction.scores]

    written = _write_outputs(
        image,
        labels,
        output_path,
        opts.overlay_path,
        opts.scores_path,
        {
            "input": str(input_path),
            "boxes": box_array.tolist(),
            "scores": scores,
            "model": _model_description(model, opts.checkpoint),
            "contract": predictor.contract.name,
        },
        overlay_source=pixels,
        overlay_boxes=box_array,
    )
    return SegmentationOutput(*written, labels=labels, scores=scores)


def _ignored_for_tracking(opts: SegmentOptions) -> None:
    """Warn about the v1 walk's settings that memory tracking does not use."""
    ignored = []
    if opts.iou_threshold is not None:
        ignored.append("the IoU stop")
    if opts.zoom not in (None, "auto"):
        ignored.append("zoom")
    if ignored:
        warnings.warn(f"{' and '.join(ignored)}: not used by SAM2 memory tracking", stacklevel=3)


def _model(opts: SegmentOptions, log: Callable[[str], None]) -> MedSAMModel | SAM2Model:
    if opts.model is not None:
        return opts.model
    return load_reporting(opts.checkpoint, opts.device, opts.contract, log, arch=opts.arch)


def _model_description(model: MedSAMModel | SAM2Model, checkpoint: str | Path | None) -> dict[str, Any]:
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "architecture": model.config.name,
        "untrained_default": bool(getattr(model, "is_untrained_default", False)),
    }


def load_reporting(
    checkpoint: str | Path | None,
    device: str | None,
    contract: str | None,
    log: Callable[[str], None],
    arch: str | None = None,
) -> MedSAMModel | SAM2Model:
    """The model of ``checkpoint`` (the embedded default when None; load_model warns if that
    one is untrained)."""
    from .weights import load_model

    model = load_model(checkpoint, contract=contract, device=device, arch=arch)
    if checkpoint is None and not getattr(model, "is_untrained_default", False):
        log("using the embedded default model (no --checkpoint given)")
    return model


def _write_outputs(
    image: MedicalImage,
    labels: np.ndarray,
    output_path: Path,
    overlay_path: str | Path | None,
    scores_path: str | Path | None,
    report: dict[str, Any],
    overlay_source: np.ndarray | None = None,
    overlay_boxes: np.ndarray | None = None,
) -> tuple[Path, Path, Path | None]:
    """Write the mask (input geometry), the scores JSON and the optional overlay PNG."""
    from .overlay import render_overlay, save_png
    from .preprocess import to_rgb_uint8

    picture = None
    if overlay_path is not None:
        assert overlay_source is not None  # given with every overlay_path
        picture = render_overlay(to_rgb_uint8(overlay_source), labels, overlay_boxes)
    scores_path = Path(scores_path) if scores_path else _default_scores_path(output_path)
    write_mask(labels, image, output_path)
    write_json(scores_path, report, indent=2)
    if picture is not None:
        assert overlay_path is not None  # a picture is made for an overlay_path only
        save_png(picture, overlay_path)
    return output_path, scores_path, (Path(overlay_path) if overlay_path else None)


def _default_scores_path(output_path: Path) -> Path:
    name = output_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff", ".npz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output_path.with_name(name + ".scores.json")


def _segment_volume_file(
    image: MedicalImage,
    output_path: Path,
    boxes: Sequence[Sequence[float]],
    opts: SegmentOptions,
    log: Callable[[str], None],
) -> SegmentationOutput:
    from .volume import Box2D, Box3D, segment_volume

    if not boxes:
        raise ValueError("give at least one box: --box X0 Y0 Z0 X1 Y1 Z1, or --box X0 Y0 X1 Y1 --slice K")
    if image.is_color:
        raise ValueError("colour volumes are not supported")
    check_mask_path(output_path, volume=True)
    Z, Y, X = image.spatial_shape
    widths = {len(b) for b in boxes}
    key_slice = opts.key_slice
    prompts: list[Box3D | Box2D]
    if widths == {6}:
        if key_slice is not None:
            raise ValueError("--slice goes with 2D boxes (X0 Y0 X1 Y1), not with 3D boxes")
        b6 = parse_boxes(boxes, 6)
        b6[:, [0, 1, 3, 4]] = _clipped(b6[:, [0, 1, 3, 4]], (Y, X), inclusive=True)
        prompts = []
        for i, (x0, y0, z0, x1, y1, z1) in enumerate(b6):
            lo, hi = max(z0, 0.0), min(z1, Z - 1.0)
            if hi < lo:
                raise ValueError(f"box {i + 1}: z-range [{z0:g}, {z1:g}] lies outside the volume's {Z} slices")
            if (lo, hi) != (z0, z1):
                warnings.warn(
                    f"box {i + 1}: z-range [{z0:g}, {z1:g}] overhangs the volume; clipped to [{lo:g}, {hi:g}]",
                    stacklevel=2,
                )
            prompts.append(Box3D(*[int(round(v)) for v in (x0, y0, lo, x1, y1, hi)]))
    elif widths == {4}:
        if key_slice is None:
            raise ValueError("2D boxes on a volume need --slice K (or give 3D boxes X0 Y0 Z0 X1 Y1 Z1)")
        if not 0 <= key_slice < Z:
            raise ValueError(f"--slice {key_slice} lies outside the volume's {Z} slices")
        b4 = _clipped(parse_boxes(boxes, 4), (Y, X), inclusive=True)
        prompts = [
            Box2D(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)), slice=key_slice)
            for x0, y0, x1, y1 in b4
        ]
    else:
        raise ValueError("boxes on a volume need 6 numbers (X0 Y0 Z0 X1 Y1 Z1) or 4 with --slice")
    pixels = _not_constant(to_model_input(image, opts.modality, opts.window), image)
    model = _model(opts, log)
    predictor = Predictor(model, contract=opts.contract)
    options: dict[str, Any] = {"iou_threshold": opts.iou_threshold}
    if opts.zoom not in (None, "auto"):
        options["zoom"] = opts.zoom
    from .model.sam2 import SAM2Model

    tracked = isinstance(model, SAM2Model)
    if isinstance(model, SAM2Model):  # memory tracking, as MedSAM2's 3D inference
        from .tracking import track_volume

        _ignored_for_tracking(opts)
        result = track_volume(model, pixels, prompts, contract=opts.contract)
    else:
        result = segment_volume(predictor, pixels, prompts, **options)
    if options.get("zoom") is not None and not tracked:
        log(
            f"zoom: {sum(result.zoomed)} of {len(prompts)} objects segmented on a magnified crop "
            f"({result.crop_embeddings_computed} crop embeddings)"
        )
    report = {
        "input": str(image.source_path),
        "boxes": [list(map(float, b)) for b in boxes],
        "model": _model_description(model, opts.checkpoint),
        "contract": predictor.contract.name,
        "objects": [
            {
                "label": i + 1 if len(prompts) > 1 else 1,
                "slices": None if r is None else list(r),
                "stopped": {"up": up, "down": down},
                "scores": {str(k): float(v) for k, v in sorted(sc.items())},
            }
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
    overlay_path = opts.overlay_path
    if overlay_path is not None:
        # Overlay of the key slice of the first object.
        k = result.key_slices[0]
        overlay_src = pixels[k]
        labels_for_overlay = labels[k]
        from .overlay import render_overlay, save_png
        from .preprocess import to_rgb_uint8

        picture = render_overlay(to_rgb_uint8(overlay_src), labels_for_overlay)
    written = _write_outputs(image, labels, output_path, None, opts.scores_path, report)
    if overlay_path is not None:
        save_png(picture, overlay_path)
        written = (written[0], written[1], Path(overlay_path))
    return SegmentationOutput(*written, labels=labels, scores=[], extra=report)


# Largest network input side for which ``zoom="auto"`` zooms 2D boxes (LiteMedSAM's 256 px).
AUTO_ZOOM_MAX_INPUT = 256


def _resolve_auto_zoom(
    zoom: ZoomPolicy | Literal["auto"] | None, predictor: Predictor, log: Callable[[str], None]
) -> ZoomPolicy | None:
    """``zoom`` itself, or for "auto" the default ZoomPolicy when the model's input is small."""
    if zoom != "auto":
        return zoom
    if predictor.contract.input_size > AUTO_ZOOM_MAX_INPUT:
        return None
    from .zoom import ZoomPolicy

    log(
        f"zoom: on for this {predictor.contract.input_size} px model (small boxes on a magnified crop; "
        "--no-zoom turns it off)"
    )
    return ZoomPolicy()


def _segment_npz(
    input_path: Path,
    output_path: Path,
    boxes: Sequence[Sequence[float]],
    opts: SegmentOptions,
    log: Callable[[str], None],
) -> SegmentationOutput:
    from .io import read_npz_case, write_npz_segs
    from .volume import segment_npz_case

    if boxes:
        raise ValueError("an npz case carries its own boxes; do not pass --box")
    case = read_npz_case(input_path)
    options: dict[str, Any] = {} if opts.iou_threshold is None else {"iou_threshold": opts.iou_threshold}
    if options and not case.is_volume:
        raise ValueError(f"{', '.join(sorted(options))} applies to 3D cases; {input_path.name} is a 2D case")
    model = _model(opts, log)
    from .model.sam2 import SAM2Model

    if case.is_volume and isinstance(model, SAM2Model):  # memory tracking
        from .tracking import track_volume
        from .volume import Box3D

        _ignored_for_tracking(opts)
        boxes3d = np.asarray(case.boxes, dtype=np.float64).reshape(-1, 6)
        if len(boxes3d) > 255:
            raise ValueError(f"{len(boxes3d)} boxes do not fit uint8 segs (at most 255)")
        if len(boxes3d) == 0:
            segs = np.zeros(case.imgs.shape[:3], np.uint8)
        else:
            prompts = [Box3D.from_array(b) for b in boxes3d]
            segs = track_volume(model, case.imgs, prompts, contract=opts.contract).labels.astype(np.uint8)
        write_npz_segs(output_path, segs, spacing=case.spacing)
        return SegmentationOutput(output_path, None, None, labels=segs, scores=[])
    predictor = Predictor(model, contract=opts.contract)
    zoom = None if case.is_volume and opts.zoom == "auto" else _resolve_auto_zoom(opts.zoom, predictor, log)
    segs = segment_npz_case(predictor, case, zoom=zoom, **options)
    write_npz_segs(output_path, segs, spacing=case.spacing)
    return SegmentationOutput(output_path, None, None, labels=segs, scores=[])
