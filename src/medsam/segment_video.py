"""``segment_video``: objects followed through a video's frames, behind ``medsam segment VIDEO``.

The video (a folder of frames, a multi-page TIFF, a video file: :mod:`medsam.io.video`) is a
stack of frames treated as a volume whose slices are frames: a 2D box ``--box X0 Y0 X1 Y1`` on
frame ``--slice K`` (or a 3D box whose z-range is a frame range) starts each object. A SAM2-family
model tracks it with memory forward and backward (:func:`medsam.tracking.track_volume`), with the
frames prepared as SAM2's video predictor prepares them (Pillow's bicubic resize, the
``medsam2`` contract's recipe, also for SAM2 / SAM2.1 checkpoints); a MedSAM / SAM model walks it
frame to frame from box to box (:func:`medsam.volume.segment_volume`). Frames keep their colours.
Output: one label PNG per frame in a folder (named after the input frames) or a multi-page TIFF;
one object is 0/1, several are labels 1..N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .segment_io import (
    SegmentationOutput,
    SegmentOptions,
    embedding_cache,
    model_description,
    objects_report,
    resolve_model,
)

__all__ = ["segment_video"]


def segment_video(
    input_path: str | Path,
    output_path: str | Path,
    boxes: Sequence[Sequence[float]],
    opts: SegmentOptions,
    log: Callable[[str], None] = lambda message: None,
) -> SegmentationOutput:
    """Segment and follow the objects of ``boxes`` through the video at ``input_path`` (module)."""
    from .io.atomic import write_json
    from .io.video import check_video_output, read_video, write_frame_labels
    from .model.sam2 import SAM2Model
    from .predictor import Predictor
    from .segment_prompts import volume_prompts
    from .volume import segment_volume

    check_video_output(output_path)
    for name, value in (("--rtstruct", opts.rtstruct_path), ("--overlay", opts.overlay_path)):
        if value is not None:
            raise ValueError(f"{name} does not apply to videos")
    video = read_video(input_path)
    prompts = volume_prompts(boxes, opts.key_slice, video.frames.shape, unit="frame", points=opts.points)
    log(f"{video.n_frames} frames of {video.frames.shape[2]} x {video.frames.shape[1]} ({video.source})")
    model = resolve_model(opts, log)
    if isinstance(model, SAM2Model):
        from .tracking import track_volume

        contract = opts.contract or ("medsam2" if model.contract in ("sam2", "medsam2") else None)
        result = track_volume(model, video.frames, prompts, contract=contract)
    else:
        contract = opts.contract
        predictor = Predictor(model, contract=contract)
        contract = predictor.contract.name
        result = segment_volume(
            predictor, video.frames, prompts, iou_threshold=opts.iou_threshold, cache=embedding_cache(opts)
        )
    labels = result.labels if len(prompts) > 1 else (result.labels > 0).astype(np.uint8)
    report: dict[str, Any] = {
        "input": str(input_path),
        "frames": video.n_frames,
        "frame_names": video.names,
        "fps": video.fps,
        "boxes": [list(map(float, b)) for b in boxes],
        "points": [[x, y, int(positive)] for x, y, positive in opts.points],
        "model": model_description(model, opts.checkpoint),
        "contract": contract,
        "objects": objects_report(result, len(prompts), unit="frames"),
        "embeddings_computed": result.embeddings_computed,
    }
    mask_path = write_frame_labels(labels, video.names, output_path)
    scores_path = None
    if opts.scores_path is not None:
        scores_path = Path(opts.scores_path)
        write_json(scores_path, report)
    return SegmentationOutput(mask_path, scores_path, None, labels=labels, scores=[], extra=report)
