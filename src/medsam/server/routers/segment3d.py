"""``/segment3d``: voxel clicks on a volume -> a 3D mask, with the SAM-Med3D model (``--model3d``)."""

from __future__ import annotations

import warnings

from fastapi import APIRouter, HTTPException

from ..encoding import rle_encode
from ..schemas import RLEMask, Segment3DRequest, Segment3DResponse
from ..state import WorkbenchDep

router = APIRouter(tags=["segment"])


@router.post(
    "/segment3d",
    response_model=Segment3DResponse,
    summary="Segment one object of a volume from voxel clicks (SAM-Med3D)",
    description="409 when the server has no SAM-Med3D model (medsam serve --model3d CKPT); 422 for a 2D "
    "image or clicks the model cannot take. The mask is returned, not saved: PUT it to /labels/{id}/map.",
)
def segment3d(body: Segment3DRequest, wb: WorkbenchDep) -> Segment3DResponse:
    if wb.native3d is None:
        raise HTTPException(409, "this server has no SAM-Med3D model: start it with --model3d CKPT")
    loaded = wb.load(body.image_id)
    clicks = [((c.i, c.j, c.k), c.positive) for c in body.clicks]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clicks outside the first crop: said by the crops answered
            result, calls, ms = wb.native3d.segment(loaded, clicks, body.sliding_window)
    except ValueError as exc:
        raise HTTPException(422, str(exc).splitlines()[0]) from None
    values, counts = rle_encode(result.mask.astype("uint8"))
    return Segment3DResponse(
        image_id=body.image_id,
        mask=RLEMask(shape=list(result.mask.shape), values=values, counts=counts),
        area=int(result.mask.sum()),
        crops=[list(w.begin) for w in result.windows],
        encoder_calls=calls,
        elapsed_ms=round(ms, 1),
    )
