"""``/segment``: prompts on one slice -> a mask (RLE and/or PNG) and the model's score."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, HTTPException

from ..encoding import png_bytes, rle_encode
from ..engine import PromptRefused
from ..schemas import Box, Candidate, RLEMask, SegmentRequest, SegmentResponse
from ..state import WorkbenchDep

router = APIRouter(tags=["segment"])


@router.post("/segment", response_model=SegmentResponse, summary="Segment one object on one slice")
def segment(body: SegmentRequest, wb: WorkbenchDep) -> SegmentResponse:
    loaded = wb.load_slice(body.image_id, body.slice_index, 422)
    box = None if body.box is None else (body.box.x0, body.box.y0, body.box.x1, body.box.y1)
    points = [(p.x, p.y, p.positive) for p in body.points]
    strokes = [([(v.x, v.y) for v in s.points], s.positive) for s in body.scribbles]
    try:
        out = wb.engine.segment(
            loaded, body.slice_index, box, points, body.previous, strokes, zoom=body.zoom, candidates=body.candidates
        )
    except PromptRefused as exc:
        raise HTTPException(422, str(exc)) from None
    mask = out.mask
    rows = np.flatnonzero(mask.any(axis=1))
    bbox = None
    if rows.size:
        cols = np.flatnonzero(mask.any(axis=0))
        bbox = Box(x0=int(cols[0]), y0=int(rows[0]), x1=int(cols[-1]), y1=int(rows[-1]))
    rle = png = None
    if body.encoding in ("rle", "both"):
        rle = _rle(mask)
    if body.encoding in ("png", "both"):
        png = base64.b64encode(png_bytes(mask.astype(np.uint8) * 255)).decode("ascii")
    window = None
    if out.window is not None:
        y0, y1, x0, x1 = out.window
        window = Box(x0=x0, y0=y0, x1=x1 - 1, y1=y1 - 1)
    candidates = [Candidate(score=score, area=int(m.sum()), mask=_rle(m)) for m, score in out.candidates]
    return SegmentResponse(
        image_id=body.image_id,
        slice_index=body.slice_index,
        score=out.score,
        area=int(mask.sum()),
        bbox=bbox,
        mask=rle,
        png_base64=png,
        logits_handle=out.handle,
        embedding_source=out.source,
        elapsed_ms=out.elapsed_ms,
        zoom_window=window,
        candidates=candidates,
    )


def _rle(mask: np.ndarray) -> RLEMask:
    values, counts = rle_encode(mask.astype(np.uint8))
    return RLEMask(shape=list(mask.shape), values=values, counts=counts)
