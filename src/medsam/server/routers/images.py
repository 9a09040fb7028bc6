"""``/images``: list the datastore, read an image's geometry, fetch a slice as PNG, upload."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.requests import ClientDisconnect

from ...intensity import CT_WINDOWS, Window
from ..datastore import UPLOAD_SUFFIXES, UploadRefused
from ..encoding import png_bytes
from ..schemas import ImageList, ImageMeta, ImageSummary, UploadResult
from ..security import UnsafePathError
from ..state import WorkbenchDep

router = APIRouter(prefix="/images", tags=["images"])


@router.get("", response_model=ImageList, summary="List images with their labelling status")
def list_images(wb: WorkbenchDep) -> ImageList:
    items = []
    for image_id in wb.datastore.list_ids():
        status, version = wb.labels.status(image_id)
        items.append(ImageSummary(id=image_id, status=status, label_version=version))
    return ImageList(images=items, count=len(items))


@router.post(
    "",
    response_model=UploadResult,
    status_code=201,
    summary="Upload one image file (raw request body)",
    description=(
        "Send the file's bytes as the body (Content-Type: application/octet-stream) and its file "
        f"name as ?name=. Accepted suffixes: {', '.join(UPLOAD_SUFFIXES)}. Refused: too large (413), "
        "unknown type (415), unreadable (422), name taken (409). Written atomically."
    ),
)
async def upload_image(request: Request, wb: WorkbenchDep, name: str = Query(max_length=255)) -> UploadResult:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/octet-stream":
        raise HTTPException(415, "send the file as the raw body with Content-Type: application/octet-stream")
    declared = request.headers.get("content-length")
    try:
        size = int(declared) if declared is not None else None
    except ValueError:
        raise HTTPException(400, "bad Content-Length") from None
    try:
        image_id = await wb.datastore.add_upload(name, request.stream(), size)
    except UnsafePathError as exc:
        raise HTTPException(400, f"refused file name: {exc}") from None
    except UploadRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except ClientDisconnect:
        raise HTTPException(400, "upload interrupted") from None
    return UploadResult(id=image_id)


@router.get(
    "/{image_id:path}/slices/{index}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
    summary="One slice as PNG, windowed for display",
)
def slice_png(
    image_id: str,
    index: int,
    wb: WorkbenchDep,
    window: str = Query("auto", description="'auto' (what the model sees), 'minmax', or a CT preset name"),
    level: float | None = Query(None, allow_inf_nan=False, description="custom window level (raw units, HU for CT)"),
    width: float | None = Query(None, gt=0, allow_inf_nan=False, description="custom window width"),
) -> Response:
    loaded = wb.load_slice(image_id, index)
    # 'auto' shows exactly what the model sees (the datastore's model input); a preset or an
    # explicit level / width clips the raw values (HU for CT) with the same Window the model uses.
    if loaded.image.is_color or (window == "auto" and (level is None or width is None)):
        picture = loaded.model_slice(index)
    else:
        try:
            if level is not None and width is not None:
                chosen = Window(level, width)
            elif window == "minmax":
                lo, hi = loaded.value_range
                chosen = Window((lo + hi) / 2, max(hi - lo, 1e-6 * max(1.0, abs(lo), abs(hi))))
            elif window in CT_WINDOWS:
                chosen = Window(*CT_WINDOWS[window])
            else:
                raise ValueError(f"unknown window {window!r}; known: auto, minmax, {', '.join(CT_WINDOWS)}")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        picture = chosen.to_uint8(loaded.raw_slice(index), nonfinite="saturate")
    if picture.ndim == 3 and picture.shape[-1] == 4:
        picture = picture[..., :3]
    return Response(
        png_bytes(np.asarray(picture, dtype=np.uint8)), media_type="image/png", headers={"Cache-Control": "no-store"}
    )


@router.get("/{image_id:path}", response_model=ImageMeta, summary="Shape, geometry and axis conventions")
def image_meta(image_id: str, wb: WorkbenchDep) -> ImageMeta:
    loaded = wb.load(image_id)
    img = loaded.image
    status, version = wb.labels.status(image_id)
    axes = "ZYX" if img.is_volume else ("YXC" if img.is_color else "YX")
    slice_shape = list(img.spatial_shape[-2:])
    return ImageMeta(
        id=image_id,
        status=status,
        label_version=version,
        shape=list(img.array.shape),
        axes=axes,
        is_volume=img.is_volume,
        is_color=img.is_color,
        n_slices=loaded.n_slices,
        slice_shape=slice_shape,
        spacing_xyz=list(img.spacing_xyz),
        spacing_zyx=list(img.spacing_zyx),
        origin=list(img.origin),
        direction=np.asarray(img.direction).tolist(),
        dtype=str(img.array.dtype),
        value_range=list(loaded.value_range),
        modality=img.modality,
        source_format=img.source_format,
        window_presets={k: list(v) for k, v in CT_WINDOWS.items()},
    )
