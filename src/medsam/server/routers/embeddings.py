"""``/images/{id}/embeddings``: warm the slice embeddings of an image in the background.

Embeddings go to the on-disk cache (``DATA/.medsam/cache``), so a restarted server does not
compute them again. ``GET`` says how many slices are cached and shows the latest warm-up job.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from ..schemas import EmbeddingRequest, EmbeddingStatus, JobInfo
from ..state import WorkbenchDep

router = APIRouter(prefix="/images", tags=["embeddings"])


@router.get("/{image_id:path}/embeddings", response_model=EmbeddingStatus, summary="Cached slices and warm-up progress")
def embedding_status(image_id: str, wb: WorkbenchDep) -> EmbeddingStatus:
    loaded = wb.load(image_id)
    job = wb.jobs.latest("embeddings", image_id)
    return EmbeddingStatus(
        image_id=image_id,
        n_slices=loaded.n_slices,
        cached_slices=wb.engine.cached_slices(loaded),
        job=JobInfo(**job.info()) if job else None,
    )


@router.post(
    "/{image_id:path}/embeddings",
    response_model=JobInfo,
    status_code=202,
    summary="Compute the slice embeddings in a background job (poll /jobs/{id} or GET this route)",
)
def warm_embeddings(image_id: str, wb: WorkbenchDep, body: EmbeddingRequest | None = None) -> JobInfo:
    loaded = wb.load(image_id)
    slices = list(range(loaded.n_slices)) if body is None or body.slices is None else list(body.slices)
    bad = [k for k in slices if not 0 <= k < loaded.n_slices]
    if bad:
        raise HTTPException(422, f"slices outside 0..{loaded.n_slices - 1}: {bad[:5]}")
    running = wb.jobs.latest("embeddings", image_id)
    if running is not None and running.active:
        return JobInfo(**running.info())

    def work(job) -> dict:
        job.progress(0, len(slices), "embedding slices")
        counts = wb.engine.warm(loaded, slices, job.progress, lambda: job.cancelled)
        return {"slices": len(slices), **counts}

    return JobInfo(**wb.jobs.submit("embeddings", image_id, work).info())
