"""``/propagate``: spread a label from its key-slice masks through the volume (background job).

The label's mask on ``slice_index`` (as last saved), and on each of ``key_slices``, gives a 2D
box (a SAM2-family model tracks from the masks themselves); :func:`medsam.volume.segment_volume`
walks up and down from each key (a corrected slice sent
as a key re-propagates the object from it, up to the next key). The result is merged into the label map and
saved as the next version, if nobody saved meanwhile (else the job fails with status 409).
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException

from ...volume import merge_propagated
from ..jobs import JobFailed
from ..labels import VersionConflict
from ..schemas import JobInfo, PropagateRequest
from ..state import WorkbenchDep

router = APIRouter(tags=["propagate"])


@router.post("/propagate", response_model=JobInfo, status_code=202, summary="Propagate a label from a key slice")
def propagate(body: PropagateRequest, wb: WorkbenchDep) -> JobInfo:
    loaded = wb.load(body.image_id)
    if not loaded.image.is_volume:
        raise HTTPException(422, "propagation needs a volume; this image is 2D")
    if loaded.image.is_color:
        raise HTTPException(422, "colour volumes are not supported")
    try:
        loaded.check_slice(body.slice_index)
    except IndexError as exc:
        raise HTTPException(422, str(exc)) from None
    version, labels = wb.labels.read(body.image_id, loaded.image)
    if version != body.expected_version:
        raise HTTPException(
            409,
            f"label was changed meanwhile: current version {version}, yours {body.expected_version}",
            headers={"ETag": f'"{version}"'},
        )
    keys: dict[int, tuple[int, int, int, int]] = {}
    key_masks: dict[int, np.ndarray] = {}
    for k in [body.slice_index, *body.key_slices]:
        try:
            loaded.check_slice(k)
        except IndexError as exc:
            raise HTTPException(422, str(exc)) from None
        key_mask = labels[k] == body.label
        if not key_mask.any():
            raise HTTPException(422, f"label {body.label} is empty on slice {k}: accept a mask there first")
        rows = np.flatnonzero(key_mask.any(axis=1))
        cols = np.flatnonzero(key_mask.any(axis=0))
        keys[int(k)] = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
        key_masks[int(k)] = key_mask

    def work(job) -> dict:
        def progress(done: int, total: int) -> None:
            if job.cancelled:
                raise JobFailed("cancelled", 499)
            job.progress(done, total, "propagating")

        result, model_info = wb.engine.propagate(
            loaded, keys, body.iou_threshold, body.box_margin, progress, masks=key_masks
        )
        predicted = result.labels
        changed = {}

        def change(current: np.ndarray) -> np.ndarray:
            before = current.copy()
            out = merge_propagated(current, predicted, body.label, set(keys), body.replace)
            changed["voxels"] = int((out != before).sum())
            return out

        event = {
            "action": "propagate",
            "slice": body.slice_index,
            "label": body.label,
            "prompts": [
                {"box": dict(zip(("x0", "y0", "x1", "y1"), box)), "slice": k, "label": body.label}
                for k, box in sorted(keys.items())
            ],
            "propagation": {
                "iou_threshold": body.iou_threshold,
                "box_margin": body.box_margin,
                "replace": body.replace,
                "slices": result.slices[0],
                "stop_reasons": list(result.stop_reasons[0]),
            },
        }
        try:
            rec = wb.labels.update(body.image_id, loaded.image, body.expected_version, change, event, None, model_info)
        except VersionConflict as exc:
            raise JobFailed(str(exc), 409) from None
        return {
            "version": rec.version,
            "slices": result.slices[0],
            "changed_voxels": changed["voxels"],
            "stop_reasons": list(result.stop_reasons[0]),
            "embeddings_computed": result.embeddings_computed,
        }

    return JobInfo(**wb.jobs.submit("propagate", body.image_id, work).info())
