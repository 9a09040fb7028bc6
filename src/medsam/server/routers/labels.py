"""``/labels``: read and save label maps, with versions and optimistic concurrency.

Every response carries ``ETag: "<version>"``. A write must name the version it was based on,
as ``If-Match: "<version>"`` or ``expected_version`` in the body (428 when neither is given);
a write based on an older version gets 409 and changes nothing. An accepted write saves the
whole label map atomically (NIfTI with the image's geometry, or PNG for plain 2D pictures) plus
the provenance sidecar, and answers the new :class:`LabelInfo`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Query, Response

from ..encoding import rle_decode, rle_encode
from ..labels import VersionConflict, default_definitions
from ..schemas import LabelInfo, LabelMap, LabelMapWrite, RLEMask, SliceLabels, SliceLabelWrite
from ..state import Workbench, WorkbenchDep

router = APIRouter(prefix="/labels", tags=["labels"])


def _etag(version: int) -> str:
    return f'"{version}"'


def expected_version(if_match: str | None, body_version: int | None) -> int:
    """The version a write is based on, from ``If-Match`` and/or the body; 400/428 otherwise."""
    header_version = None
    if if_match is not None:
        text = if_match.strip()
        if text.startswith("W/"):
            text = text[2:]
        text = text.strip('"')
        if not text.isdigit():
            raise HTTPException(400, 'If-Match must be a version ETag such as "3"')
        header_version = int(text)
    if header_version is not None and body_version is not None and header_version != body_version:
        raise HTTPException(400, "If-Match and expected_version disagree")
    version = header_version if header_version is not None else body_version
    if version is None:
        raise HTTPException(428, 'name the version you edited: If-Match: "<version>" (0 for a new label)')
    return version


def label_info(wb: Workbench, image_id: str) -> LabelInfo:
    loaded = wb.load(image_id)
    try:
        rec = wb.labels.record(image_id)
    except RuntimeError as exc:
        raise HTTPException(500, str(exc)) from None
    path = wb.labels.label_file(image_id) if rec.version else None
    fmt = wb.labels.label_format(loaded.image)
    return LabelInfo(
        image_id=image_id,
        version=rec.version,
        exists=rec.version > 0,
        labels=rec.get("labels") or default_definitions(),
        file=wb.labels.rel_to_data(path) if path else None,
        format=fmt,
        updated=rec.get("updated"),
        history_length=len(rec.get("history", [])),
        model=rec.get("model"),
    )


def _conflict(exc: VersionConflict) -> HTTPException:
    return HTTPException(409, str(exc), headers={"ETag": _etag(exc.current)})


def _decode(mask, shape: tuple[int, ...], what: str, definitions) -> np.ndarray:
    """An RLE mask of exactly ``shape`` with only defined label values (422 otherwise)."""
    if tuple(mask.shape) != shape:
        raise HTTPException(422, f"mask shape {mask.shape} is not the {what} {list(shape)}")
    try:
        labels = rle_decode(mask.values, mask.counts, shape)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    _check_values(labels, definitions)
    return labels


def _saved(wb: Workbench, image_id: str, write, body, response: Response) -> LabelInfo:
    """Run a versioned label write (409 on a stale version) and answer with the new label info."""
    defs = [d.model_dump() for d in body.definitions] if body.definitions is not None else None
    try:
        write(defs, wb.engine.model_info())
    except VersionConflict as exc:
        raise _conflict(exc) from None
    info = label_info(wb, image_id)
    response.headers["ETag"] = _etag(info.version)
    return info


@router.get("/{image_id:path}/slices/{index}", response_model=SliceLabels, summary="Labels of one slice")
def get_slice(image_id: str, index: int, wb: WorkbenchDep, response: Response) -> SliceLabels:
    loaded = wb.load_slice(image_id, index)
    version, labels = wb.labels.read(image_id, loaded.image)
    plane = labels[index] if loaded.image.is_volume else labels
    values, counts = rle_encode(plane)
    response.headers["ETag"] = _etag(version)
    return SliceLabels(
        image_id=image_id,
        slice_index=index,
        version=version,
        mask=RLEMask(shape=list(plane.shape), values=values, counts=counts),
    )


@router.put("/{image_id:path}/slices/{index}", response_model=LabelInfo, summary="Save the labels of one slice")
def put_slice(
    image_id: str,
    index: int,
    body: SliceLabelWrite,
    wb: WorkbenchDep,
    response: Response,
    if_match: str | None = Header(default=None),
) -> LabelInfo:
    version = expected_version(if_match, body.expected_version)
    loaded = wb.load_slice(image_id, index)
    plane = _decode(body.mask, tuple(loaded.image.spatial_shape[-2:]), "slice shape", body.definitions)

    def change(current: np.ndarray) -> np.ndarray:
        if loaded.image.is_volume:
            current[index] = plane
            return current
        return plane

    event = {"action": "slice", "slice": index, **body.provenance.model_dump(exclude_none=True)}
    return _saved(
        wb,
        image_id,
        lambda defs, model: wb.labels.update(image_id, loaded.image, version, change, event, defs, model),
        body,
        response,
    )


@router.get("/{image_id:path}/map", response_model=LabelMap, summary="The whole label map (RLE, array order)")
def get_map(image_id: str, wb: WorkbenchDep, response: Response) -> LabelMap:
    loaded = wb.load(image_id)
    version, labels = wb.labels.read(image_id, loaded.image)
    values, counts = rle_encode(labels)
    response.headers["ETag"] = _etag(version)
    return LabelMap(
        image_id=image_id, version=version, mask=RLEMask(shape=list(labels.shape), values=values, counts=counts)
    )


@router.put("/{image_id:path}/map", response_model=LabelInfo, summary="Replace the whole label map")
def put_map(
    image_id: str,
    body: LabelMapWrite,
    wb: WorkbenchDep,
    response: Response,
    if_match: str | None = Header(default=None),
) -> LabelInfo:
    version = expected_version(if_match, body.expected_version)
    loaded = wb.load(image_id)
    labels = _decode(body.mask, tuple(loaded.image.spatial_shape), "image's spatial shape", body.definitions)
    event = {"action": "map", **body.provenance.model_dump(exclude_none=True)}
    return _saved(
        wb,
        image_id,
        lambda defs, model: wb.labels.save(image_id, loaded.image, labels, version, event, defs, model),
        body,
        response,
    )


@router.get(
    "/{image_id:path}/export",
    response_class=Response,
    responses={200: {"content": {"application/dicom": {}}}},
    summary="The label map as DICOM-SEG or RTSTRUCT (images read from DICOM)",
)
def export(
    image_id: str,
    wb: WorkbenchDep,
    format: Literal["dicom-seg", "rtstruct"] = Query(description="dicom-seg (highdicom) or rtstruct"),
) -> Response:
    """The saved label map of a DICOM image as a DICOM Segmentation or an RT Structure Set that
    references the image's instances; segment / ROI names are the label definitions' names."""
    import tempfile
    from pathlib import Path
    from urllib.parse import quote

    loaded = wb.load(image_id)
    if loaded.image.source_format not in ("dicom", "dicom-series"):
        raise HTTPException(
            422, f"{format} references DICOM instances; this image was read from {loaded.image.source_format}"
        )
    version, labels = wb.labels.read(image_id, loaded.image)
    if not labels.any():
        raise HTTPException(422, "the label map is empty: nothing to export")
    definitions = wb.labels.record(image_id).get("labels") or default_definitions()
    names = {int(d["value"]): str(d["name"]) for d in definitions}
    colours = {int(d["value"]): _rgb(str(d.get("color", ""))) for d in definitions}
    colours = {k: v for k, v in colours.items() if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.dcm"
        try:
            if format == "dicom-seg":
                from ...io.dicom_seg import write_dicom_seg

                write_dicom_seg(labels, loaded.image, path, names, colours=colours)
            else:
                from ...io.rtstruct import write_rtstruct

                write_rtstruct(labels, loaded.image, path, names, colours=colours)
        except ImportError as exc:
            raise HTTPException(501, str(exc)) from None
        except FileNotFoundError as exc:
            raise HTTPException(409, f"the image's DICOM files changed on disk: {exc}") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        body = path.read_bytes()
    name = f"{Path(image_id).name}.{format}.v{version}.dcm"
    ascii_name = name.encode("ascii", "replace").decode("ascii").replace('"', "_").replace("?", "_")
    return Response(
        body,
        media_type="application/dicom",
        headers={
            "ETag": _etag(version),
            "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}",
        },
    )


@router.get("/{image_id:path}", response_model=LabelInfo, summary="Version, label names and colours, file")
def get_label(image_id: str, wb: WorkbenchDep, response: Response) -> LabelInfo:
    info = label_info(wb, image_id)
    response.headers["ETag"] = _etag(info.version)
    return info


def _rgb(text: str) -> tuple[int, int, int] | None:
    """``#rrggbb`` -> (r, g, b); None for anything else."""
    if len(text) == 7 and text.startswith("#"):
        try:
            return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)
        except ValueError:
            return None
    return None


def _check_values(labels: np.ndarray, definitions) -> None:
    if definitions is None:
        return
    allowed = {0} | {d.value for d in definitions}
    present = set(np.unique(labels).tolist())
    unknown = sorted(present - allowed)
    if unknown:
        raise HTTPException(422, f"label values {unknown[:10]} have no definition")
