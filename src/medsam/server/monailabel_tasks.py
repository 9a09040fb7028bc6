"""The work behind ``/monailabel``'s infer and label save (run in worker threads by the routes in
:mod:`medsam.server.routers.monailabel`; the wire details are in
:mod:`medsam.server.monailabel_protocol`).

* :func:`run_infer`: the ``medsam`` model segments one slice (:meth:`SegmentationEngine.segment`
  with the region's box and the slice's clicks); ``medsam_3d`` segments the object through the
  volume, from the region of interest as a :class:`medsam.volume.Box3D` (never leaving its
  slices) or, without one, from the clicks on one slice as a :class:`medsam.volume.Clicks2D`
  (tracked with memory by a SAM2-family model; walked from the clicks' mask's box by a MedSAM
  model, the clicked slice keeping the clicks' mask). The answer is a label map of the image's
  shape, 1 on the object.
* :func:`store_label`: an uploaded label file (NIfTI, NRRD, MetaImage, PNG) becomes the image's
  next label version if it has the image's shape and geometry and values 0..255.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from starlette.datastructures import UploadFile

from .datastore import LoadedImage
from .engine import PromptRefused
from .labels import LabelRecord, VersionConflict, default_definitions
from .monailabel_protocol import ParamsRefused, parse_infer_params, plan_slice
from .schemas import PropagateRequest
from .state import Workbench

__all__ = ["run_infer", "stage_upload", "store_label"]

_CHUNK = 1 << 20


def _shape_zyx(loaded: LoadedImage) -> tuple[int, int, int]:
    shape = loaded.image.spatial_shape
    return (
        (int(shape[0]), int(shape[1]), int(shape[2])) if loaded.image.is_volume else (1, int(shape[0]), int(shape[1]))
    )


def _segment_slice(
    wb: Workbench,
    loaded: LoadedImage,
    index: int,
    box: tuple[int, int, int, int] | None,
    points: list[tuple[int, int, bool]],
) -> tuple[np.ndarray, float]:
    try:
        out = wb.engine.segment(loaded, index, box, [(float(x), float(y), pos) for x, y, pos in points], None)
    except PromptRefused as exc:
        raise ParamsRefused(str(exc)) from None
    return out.mask, out.score


def run_infer(
    wb: Workbench, loaded: LoadedImage, model: str, params: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any], str]:
    """``(label map, answer params, result file suffix)`` of one infer request; raises
    :class:`ParamsRefused` for prompts that cannot be used."""
    from ..errors import PromptError
    from ..volume import Box3D, Clicks2D

    prompt = parse_infer_params(params, _shape_zyx(loaded), default_definitions()[0]["name"])
    shape = loaded.image.spatial_shape
    labels = np.zeros(shape, dtype=np.uint8)
    answer: dict[str, Any] = {"label_names": {prompt.label: 1}, "model": model}
    volume = loaded.image.is_volume
    if model == "medsam" or not volume:
        index, box, points = plan_slice(prompt)
        mask, score = _segment_slice(wb, loaded, index, box, points)
        if volume:
            labels[index][mask] = 1
        else:
            labels[mask] = 1
        answer.update(slice=index, score=score, slices=[index, index] if mask.any() else [])
        return labels, answer, prompt.result_suffix
    defaults = PropagateRequest.model_fields
    iou, margin = float(defaults["iou_threshold"].default), int(defaults["box_margin"].default)
    if prompt.roi is not None:
        x0, y0, z0, x1, y1, z1 = prompt.roi
        object_prompt: Any = Box3D(x0, y0, z0, x1, y1, z1)
        answer["key_slice"] = (z0 + z1) // 2
    else:  # clicks on one slice: SAM2 tracks from them, MedSAM walks from their mask's box
        index, _, points = plan_slice(prompt)
        object_prompt = Clicks2D(tuple((x, y) for x, y, _ in points), tuple(int(p) for _, _, p in points), index)
        answer["key_slice"] = index
    try:
        result, model_info = wb.engine.segment_object(loaded, object_prompt, iou, margin, lambda done, total: None)
    except PromptError as exc:
        raise ParamsRefused(str(exc)) from None
    labels[:] = result.labels > 0
    lo_hi = result.slices[0]
    answer.update(slices=list(lo_hi) if lo_hi else [], stop_reasons=list(result.stop_reasons[0]))
    answer["served_model"] = model_info.get("name")
    return labels, answer, prompt.result_suffix


async def stage_upload(wb: Workbench, upload: UploadFile, suffix: str) -> Path:
    """Copy an uploaded file into a private folder under ``.medsam/uploads`` (413 past the
    upload limit); the caller removes the folder."""
    staging = wb.settings.state_dir / "uploads"
    staging.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ml.", dir=staging))
    path = folder / f"label{suffix}"
    limit = int(wb.settings.max_upload_bytes)
    size = 0
    try:
        with open(path, "wb") as fh:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"upload larger than the limit of {limit} bytes")
                fh.write(chunk)
        if size == 0:
            raise HTTPException(422, "empty label file")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


def _label_map(wb: Workbench, loaded: LoadedImage, path: Path) -> np.ndarray:
    from ..io import check_same_geometry, read_image
    from ..io.header import ImageTooLarge

    try:
        wb.datastore.check_size(path)
        label = read_image(path)
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except Exception as exc:  # any reader failure: not a label file we can use
        raise HTTPException(422, f"not a readable label file: {str(exc).splitlines()[0][:200]}") from None
    if label.is_color:
        raise HTTPException(422, "a label file holds one value per voxel, not colours")
    array = np.asarray(label.array)
    target = loaded.image.spatial_shape
    if array.shape != target and array.shape == (1, *target):
        array = array[0]  # a 2D image's label written as a one-slice volume
    if array.shape != target:
        raise HTTPException(422, f"label shape {array.shape} differs from the image's {target} (array order)")
    if label.geometry_ndim == loaded.image.geometry_ndim:
        try:
            check_same_geometry(loaded.image, label, atol=1e-3)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
    if array.size and (not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255):
        raise HTTPException(422, "label values must be 0..255")
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise HTTPException(422, "label values must be whole numbers")
    return array.astype(np.uint8)


def _definitions(previous: list[dict[str, Any]], label_info: Any, present: np.ndarray) -> list[dict[str, Any]]:
    """The label names after a save: the client's ``label_info`` (``[{"name", "idx"}]``) over the
    previous names, with default names and colours for values that have none."""
    colors = {d["value"]: d["color"] for d in default_definitions(max(int(present.max(initial=0)), 3))}
    by_value = {int(d["value"]): dict(d) for d in previous}
    if isinstance(label_info, list):
        for item in label_info[:255]:
            if not isinstance(item, dict):
                continue
            value = item.get("idx", item.get("id", item.get("value")))
            name = item.get("name")
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 255 and isinstance(name, str):
                entry = by_value.setdefault(value, {"value": value, "color": colors.get(value, "#808080")})
                entry["name"] = name[:200]
    for value in (int(v) for v in present if v):
        by_value.setdefault(value, {"value": value, "name": f"label {value}", "color": colors.get(value, "#808080")})
    return [by_value[v] for v in sorted(by_value)]


def store_label(wb: Workbench, image_id: str, path: Path, params: dict[str, Any], tag: str) -> LabelRecord:
    """Save the label file at ``path`` as ``image_id``'s next version (see the module)."""
    loaded = wb.load(image_id)
    array = _label_map(wb, loaded, path)
    present = np.unique(array)
    client = params.get("client_id")
    event = {"action": "monailabel-save", "tag": tag, "client_id": client if isinstance(client, str) else None}
    for _ in range(3):  # a client's save replaces the whole map: retry when a save came between
        rec = wb.labels.record(image_id)
        definitions = _definitions(rec.get("labels") or default_definitions(), params.get("label_info"), present)
        try:
            return wb.labels.save(image_id, loaded.image, array, rec.version, event, definitions, None)
        except VersionConflict:
            continue
    raise HTTPException(409, "the label kept changing while saving; try again")
