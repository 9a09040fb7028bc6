"""``/train``: fine-tune the served model on the accepted labels, and choose the served model.

``POST /train`` starts a background job (202; 409 while one runs; 422 with too few accepted
labels); ``GET /train/jobs/{id}`` reports its phase, progress, log tail and the before/after
scores on the held-out labels; ``DELETE`` cancels it. When a job ends well the server serves the
new model; ``GET /train/models`` lists the models and ``POST /train/models/select`` switches
between them (409 while a job runs). See :mod:`medsam.server.training_job`.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from ..schemas import ModelList, SelectModelRequest, TrainJobStatus, TrainRequest
from ..state import Workbench, WorkbenchDep
from ..training_job import TrainingRefused

router = APIRouter(prefix="/train", tags=["train"])


def _status(job) -> TrainJobStatus:
    return TrainJobStatus(**job.info())


def model_list(wb: Workbench) -> ModelList:
    t = wb.training
    return ModelList(served=t.served, training=t.active_job() is not None, models=t.models())


@router.post(
    "",
    response_model=TrainJobStatus,
    status_code=202,
    summary="Fine-tune the served model on the accepted labels (background job)",
    description=(
        "Writes the accepted labels as a corpus, holds out images by a hash of their id, scores the served "
        "model on them, runs `medsam train` (decoder-only or LoRA) in a child process, scores the new model "
        "and serves it. 409 while a job runs; 422 with too few accepted labels or bad parameters."
    ),
)
def start_training(wb: WorkbenchDep, body: TrainRequest | None = None) -> TrainJobStatus:
    body = body or TrainRequest()
    try:
        job = wb.training.start(body.mode, body.steps, body.lr)
    except TrainingRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _status(job)


@router.get("/jobs", response_model=list[TrainJobStatus], summary="Training jobs of this server run, oldest first")
def list_training_jobs(wb: WorkbenchDep) -> list[TrainJobStatus]:
    return [_status(j) for j in wb.training.all()]


@router.get("/jobs/{job_id}", response_model=TrainJobStatus, summary="State, progress, log tail and scores of a job")
def get_training_job(job_id: str, wb: WorkbenchDep) -> TrainJobStatus:
    job = wb.training.get(job_id)
    if job is None:
        raise HTTPException(404, "no such training job")
    return _status(job)


@router.delete("/jobs/{job_id}", response_model=TrainJobStatus, summary="Cancel a training job (the model stays)")
def cancel_training_job(job_id: str, wb: WorkbenchDep) -> TrainJobStatus:
    job = wb.training.cancel(job_id)
    if job is None:
        raise HTTPException(404, "no such training job")
    return _status(job)


@router.get("/models", response_model=ModelList, summary="The startup model and the trained ones; which is served")
def list_models(wb: WorkbenchDep) -> ModelList:
    return model_list(wb)


@router.post("/models/select", response_model=ModelList, summary="Serve another model (e.g. switch back)")
def select_model(body: SelectModelRequest, wb: WorkbenchDep) -> ModelList:
    try:
        wb.training.select(body.model_id)
    except TrainingRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return model_list(wb)
