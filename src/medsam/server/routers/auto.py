"""``/auto``: every object of one slice without prompts (background job; nothing is saved).

:func:`medsam.automatic.generate_masks` on the slice's model input, with the served model: SAM's
everything mode for SAM-contract models, region-proposal boxes for MedSAM models. The job's
result holds the instance map as RLE and one record per object; the client saves what it keeps
through ``/labels``.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from ..encoding import rle_encode
from ..jobs import JobFailed
from ..schemas import AutoRequest, JobInfo
from ..state import WorkbenchDep

router = APIRouter(tags=["auto"])


@router.post("/auto", response_model=JobInfo, status_code=202, summary="Every object of one slice (background job)")
def auto(body: AutoRequest, wb: WorkbenchDep) -> JobInfo:
    from ...automatic import AutoOptions, instance_label_map

    loaded = wb.load_slice(body.image_id, body.slice_index, 422)
    try:
        options = AutoOptions(
            prompt=body.prompt,
            points_per_side=body.points_per_side,
            pred_iou_thresh=body.pred_iou_thresh,
            stability_score_thresh=body.stability_score_thresh,
            min_mask_region_area=body.min_mask_region_area,
        )
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None

    def work(job) -> dict:
        def progress(done: int, total: int) -> None:  # also where a cancelled job stops
            if job.cancelled:
                raise JobFailed("cancelled", 499)
            job.progress(done, total, "finding objects")

        progress(0, 1)
        picture = loaded.model_slice(body.slice_index)
        found, model_info = wb.engine.automatic(picture, options, progress)
        labels = instance_label_map(found, picture.shape[:2])
        values, counts = rle_encode(labels)
        return {
            "slice_index": body.slice_index,
            "mask": {"shape": list(labels.shape), "values": values, "counts": counts},
            "objects": [{"label": i + 1, **m.record()} for i, m in enumerate(found)],
            "model": model_info,
        }

    return JobInfo(**wb.jobs.submit("auto", body.image_id, work).info())
