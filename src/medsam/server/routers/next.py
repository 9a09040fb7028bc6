"""``/next``: active learning -- rank unlabelled images by the model's uncertainty.

``POST /next/score`` scores images in a background job (one embedding per image, cached);
``GET /next`` ranks with the scores stored so far. See :mod:`medsam.server.active_learning`.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from ..active_learning import METHOD, rank_images
from ..schemas import JobInfo, NextResponse, RankedImage, UncertaintyRequest
from ..state import WorkbenchDep

router = APIRouter(prefix="/next", tags=["next"])


@router.get("", response_model=NextResponse, summary="Images ranked for annotation, most uncertain first")
def next_images(
    wb: WorkbenchDep, limit: int = Query(20, ge=1, le=1000), include_labelled: bool = False
) -> NextResponse:
    ids = wb.datastore.list_ids()
    status = {i: wb.labels.status(i)[0] for i in ids}
    if not include_labelled:
        ids = [i for i in ids if status[i] == "unlabelled"]
    scores = wb.uncertainty.scores(wb.engine.fingerprint())
    ranked = rank_images(ids, status, scores)
    scored = sum(r["uncertainty"] is not None for r in ranked)
    return NextResponse(
        method=METHOD, images=[RankedImage(**r) for r in ranked[:limit]], scored=scored, unscored=len(ranked) - scored
    )


@router.post("/score", response_model=JobInfo, status_code=202, summary="Score images' uncertainty (background job)")
def score_images(wb: WorkbenchDep, body: UncertaintyRequest | None = None) -> JobInfo:
    body = body or UncertaintyRequest()
    if body.image_ids is None:
        ids = [i for i in wb.datastore.list_ids() if wb.labels.status(i)[0] == "unlabelled"]
    else:
        ids = list(body.image_ids)
        for i in ids:
            wb.check_id(i)
    if len(ids) > 10_000:
        raise HTTPException(422, "too many images in one scoring job (at most 10000)")

    def work(job) -> dict:
        fp = wb.engine.fingerprint()
        failed = []
        for n, image_id in enumerate(ids):
            if job.cancelled:
                break
            try:
                loaded = wb.datastore.load(image_id)
                score = wb.engine.uncertainty(loaded, body.jitters, body.jitter_fraction)
                wb.uncertainty.put(fp, image_id, score)
            except Exception as exc:  # one unreadable image must not stop the ranking
                failed.append({"image_id": image_id, "error": str(exc).splitlines()[0][:200]})
            job.progress(n + 1, len(ids), image_id)
        return {"scored": len(ids) - len(failed), "failed": failed}

    return JobInfo(**wb.jobs.submit("uncertainty", None, work).info())
