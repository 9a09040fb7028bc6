"""``/jobs``: background jobs (embedding warm-up, propagation, uncertainty scoring)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from ..schemas import JobInfo
from ..state import WorkbenchDep

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=list[JobInfo], summary="All known jobs, oldest first")
def list_jobs(wb: WorkbenchDep) -> list[JobInfo]:
    return [JobInfo(**j.info()) for j in wb.jobs.all()]


@router.get("/{job_id}", response_model=JobInfo, summary="Status, progress and result of one job")
def get_job(job_id: str, wb: WorkbenchDep) -> JobInfo:
    job = wb.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return JobInfo(**job.info())


@router.delete("/{job_id}", response_model=JobInfo, summary="Cancel a queued or running job")
def cancel_job(job_id: str, wb: WorkbenchDep) -> JobInfo:
    job = wb.jobs.cancel(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return JobInfo(**job.info())
