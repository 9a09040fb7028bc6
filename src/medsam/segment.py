"""File-level segmentation: read an image, prompt the model, write mask, overlay and scores.

This is what ``medsam segment`` runs; it is an ordinary library function so that Python users
and the CLI share one path. All outputs are computed in memory first and written atomically at
the end, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .embedding_cache import set_image_cached
from .io import MedicalImage, read_image
from .io.formats import check_mask_path, check_segment_paths, format_of
from .predictor import Prediction, Predictor, masks_to_label_map
from .segment_io import SegmentationOutput as SegmentationOutput
from .segment_io import SegmentOptions as SegmentOptions
from .segment_io import (
    embedding_cache,
    model_description,
    not_constant,
    objects_report,
    resolve_any_model,
    resolve_model,
    to_model_input,
    write_outputs,
)
from .segment_io import load_reporting as load_reporting
from .segment_prompts import checked_clicks, clipped, parse_boxes, volume_prompts

if TYPE_CHECKING:  # pragma: no cover
    from .zoom import ZoomedPrediction, ZoomPolicy

__all__ = ["SegmentOptions", "SegmentationOutput", "load_reporting", "parse_boxes", "segment_file", "to_model_input"]


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
    if opts.auto is not None and (boxes or opts.points):
        raise ValueError("automatic mode finds its own objects: give either boxes or auto, not both (nor clicks)")
    if opts.auto is None and (opts.proposals is not None or opts.specialist is not None):
        raise ValueError("proposals and a specialist are used by automatic mode: pass auto too")
    if opts.sliding_window and not opts.voxel_points:
        raise ValueError("--sliding-window applies to voxel clicks (--point I J K) with a SAM-Med3D checkpoint")
    if opts.voxel_points and (boxes or opts.points or opts.auto is not None or opts.key_slice is not None):
        raise ValueError(
            "voxel clicks (--point I J K) are the only prompt of SAM-Med3D: no boxes, 2D clicks, --slice or --auto"
        )
    from .io.video import is_video

    if opts.voxel_points and (is_video(input_path) or format_of(input_path) == "npz"):
        raise ValueError("voxel clicks (--point I J K) need a volume file (NIfTI, NRRD, MHA, a DICOM series)")

    if is_video(input_path):
        if opts.auto is not None:
            raise ValueError("automatic mode does not apply to videos: give a box on a frame (--box ... --slice K)")
        from .segment_video import segment_video

        return segment_video(input_path, output_path, boxes, opts, log)
    if format_of(input_path) == "npz":
        if opts.points:
            raise ValueError(".npz cases carry their own boxes: clicks do not apply")
        if opts.auto is not None:
            raise ValueError("automatic mode does not apply to .npz cases (they carry their own boxes)")
        return _segment_npz(input_path, output_path, boxes, opts, log)
    image = read_image(input_path, series_uid=opts.series_uid)
    if opts.voxel_points:
        return _segment_voxel_clicks_file(image, output_path, opts, log)
    if opts.auto is not None:
        from .segment_auto import segment_auto

        return segment_auto(image, output_path, opts, opts.auto, log)
    if image.is_volume:
        return _segment_volume_file(image, output_path, boxes, opts, log)
    if opts.key_slice is not None:
        raise ValueError("--slice only applies to volumes; the input is a 2D image")
    if not boxes and not opts.points:
        raise ValueError("give at least one box (--box X0 Y0 X1 Y1) or a click (--point X Y)")
    clicks = checked_clicks(opts.points, len(boxes), image.spatial_shape[:2])
    box_array = clipped(parse_boxes(boxes, 4), image.spatial_shape) if boxes else np.zeros((0, 4))
    pixels = not_constant(to_model_input(image, opts.modality, opts.window), image)

    model = resolve_model(opts, log)
    predictor = Predictor(model, contract=opts.contract, zoom=opts.zoom)
    zoom = None if clicks else _logged_zoom(opts.zoom, predictor, log)
    prediction: ZoomedPrediction | Prediction
    if clicks:  # one object from the clicks (and its box)
        set_image_cached(predictor, pixels, embedding_cache(opts))
        prediction = predictor.predict(
            zoom=False,
            boxes=box_array if len(box_array) else None,
            points=np.asarray([[(x, y) for x, y, _ in clicks]], dtype=np.float64),
            point_labels=np.asarray([[1 if positive else 0 for _, _, positive in clicks]]),
        )
        labels = prediction.masks[0].astype(np.uint8)
    elif zoom is not None:
        from .zoom import predict_with_zoom

        # Embeds the whole image only if a box is too large to zoom.
        prediction = predict_with_zoom(predictor, pixels, box_array, zoom, score_maps=len(box_array) > 1)
        log(f"zoom: {int(prediction.zoomed.sum())} of {len(box_array)} boxes segmented on a magnified crop")
        labels = prediction.masks[0].astype(np.uint8) if len(box_array) == 1 else prediction.label_map()
    else:
        set_image_cached(predictor, pixels, embedding_cache(opts))
        prediction = predictor.predict(boxes=box_array)
        labels = prediction.masks[0].astype(np.uint8) if len(box_array) == 1 else masks_to_label_map(prediction)
    scores = [float(s) for s in prediction.scores]

    written = write_outputs(
        image,
        labels,
        output_path,
        opts.overlay_path,
        opts.scores_path,
        {
            "input": str(input_path),
            "boxes": box_array.tolist(),
            "points": [[x, y, int(positive)] for x, y, positive in clicks],
            "scores": scores,
            "model": model_description(model, opts.checkpoint),
            "contract": predictor.contract.name,
        },
        overlay_source=pixels,
        overlay_boxes=box_array,
        rtstruct_path=opts.rtstruct_path,
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


def _segment_volume_file(
    image: MedicalImage,
    output_path: Path,
    boxes: Sequence[Sequence[float]],
    opts: SegmentOptions,
    log: Callable[[str], None],
) -> SegmentationOutput:
    from .volume import segment_volume

    if image.is_color:
        raise ValueError("colour volumes are not supported")
    check_mask_path(output_path, volume=True, dicom_source=image.source_format in ("dicom", "dicom-series"))
    prompts = volume_prompts(boxes, opts.key_slice, image.spatial_shape, points=opts.points)
    pixels = not_constant(to_model_input(image, opts.modality, opts.window), image)
    model = resolve_model(opts, log)
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
        result = segment_volume(predictor, pixels, prompts, cache=embedding_cache(opts), **options)
    if options.get("zoom") is not None and not tracked:
        log(
            f"zoom: {sum(result.zoomed)} of {len(prompts)} objects segmented on a magnified crop "
            f"({result.crop_embeddings_computed} crop embeddings)"
        )
    report = {
        "input": str(image.source_path),
        "boxes": [list(map(float, b)) for b in boxes],
        "points": [[x, y, int(positive)] for x, y, positive in opts.points],
        "model": model_description(model, opts.checkpoint),
        "contract": predictor.contract.name,
        "objects": objects_report(result, len(prompts)),
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
    written = write_outputs(
        image, labels, output_path, None, opts.scores_path, report, rtstruct_path=opts.rtstruct_path
    )
    if overlay_path is not None:
        save_png(picture, overlay_path)
        written = (written[0], written[1], Path(overlay_path))
    return SegmentationOutput(*written, labels=labels, scores=[], extra=report)


def _segment_voxel_clicks_file(
    image: MedicalImage, output_path: Path, opts: SegmentOptions, log: Callable[[str], None]
) -> SegmentationOutput:
    """One object of a volume from voxel clicks, natively in 3D (:mod:`medsam.native3d`)."""
    from .model.sam_med3d import SamMed3DModel
    from .native3d import VoxelClick, check_clicks, segment_clicks_3d

    if not image.is_volume or image.is_color:
        raise ValueError("voxel clicks (--point I J K) need a grey volume; the input is not one")
    check_mask_path(output_path, volume=True, dicom_source=image.source_format in ("dicom", "dicom-series"))
    clicks = [VoxelClick((i, j, k), positive) for i, j, k, positive in opts.voxel_points]
    check_clicks(clicks, image.spatial_shape)
    model = resolve_any_model(opts, log)
    if not isinstance(model, SamMed3DModel):
        raise ValueError(
            "voxel clicks (--point I J K) need a SAM-Med3D checkpoint (--checkpoint sam_med3d_turbo.pth); "
            "other models take 2D clicks (--point X Y) on a slice (--slice K)"
        )
    result = segment_clicks_3d(model, image, clicks, sliding_window=opts.sliding_window)
    log(f"SAM-Med3D: {len(clicks)} clicks, {len(result.windows)} crops, {int(result.mask.sum())} voxels segmented")
    report = {
        "input": str(image.source_path),
        "points": [[i, j, k, int(positive)] for i, j, k, positive in opts.voxel_points],
        "model": model_description(model, opts.checkpoint),
        "contract": model.contract,
        "crop_begin_ras": list(result.grid.begin),
        "clicks_in_crop": result.clicks_in_cube.tolist(),
        "crops": [{"begin_ras": list(w.begin), "clicks": w.clicks.tolist()} for w in result.windows],
        "voxels": int(result.mask.sum()),
    }
    written = write_outputs(
        image, result.mask, output_path, None, opts.scores_path, report, rtstruct_path=opts.rtstruct_path
    )
    if opts.overlay_path is not None:  # the slice of the first click
        from .overlay import render_overlay, save_png
        from .preprocess import to_rgb_uint8

        k = clicks[0].index[2]
        pixels = to_model_input(image, opts.modality, opts.window)
        save_png(render_overlay(to_rgb_uint8(pixels[k]), result.mask[k]), opts.overlay_path)
        written = (written[0], written[1], Path(opts.overlay_path))
    return SegmentationOutput(*written, labels=result.mask, scores=[], extra=report)


def _logged_zoom(
    zoom: ZoomPolicy | Literal["auto"] | None, predictor: Predictor, log: Callable[[str], None]
) -> ZoomPolicy | None:
    """The predictor's resolved zoom policy (:func:`medsam.zoom.resolve_zoom` of ``zoom``); says
    so when "auto" turned it on."""
    if zoom == "auto" and predictor.zoom is not None:
        log(
            f"zoom: on for this {predictor.contract.input_size} px model (small boxes on a magnified crop; "
            "--no-zoom turns it off)"
        )
    return predictor.zoom


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
    model = resolve_model(opts, log)
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
    predictor = Predictor(model, contract=opts.contract, zoom=opts.zoom)
    zoom = None if case.is_volume and opts.zoom == "auto" else _logged_zoom(opts.zoom, predictor, log)
    segs = segment_npz_case(predictor, case, zoom=zoom, **options)
    write_npz_segs(output_path, segs, spacing=case.spacing)
    return SegmentationOutput(output_path, None, None, labels=segs, scores=[])
