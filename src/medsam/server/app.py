"""``create_app``: the workbench's FastAPI application over one data folder.

    app = create_app("/data/study")                        # embedded default model, no token
    app = create_app("/data/study", model=my_model, token="s3cret", max_upload_bytes=2**30)

Nothing happens at import time; ``create_app`` only checks the folder and builds objects. The
model is loaded on first use unless one is passed in. The page is served at ``/`` (its files from
``static/``); the API's OpenAPI schema at ``/openapi.json`` (FastAPI's ``/docs`` pages load
scripts from a CDN and are therefore switched off).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .active_learning import UncertaintyStore
from .datastore import UPLOAD_SUFFIXES, Datastore
from .encoder_service import EncoderServiceError, RemoteEncoder
from .engine import SegmentationEngine
from .jobs import JobManager
from .labels import LabelStore
from .monailabel_sessions import SessionStore
from .native3d_engine import Native3DEngine
from .routers import auto, embeddings, images, jobs, labels, monailabel, propagate, segment, segment3d, train
from .routers import next as next_router
from .schemas import ServerInfo
from .security import TokenAndHostMiddleware
from .settings import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_VOXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    STATE_DIR,
    ServerSettings,
)
from .shared_training import SharedTraining
from .state import Workbench, WorkbenchDep
from .state_db import StateDatabase, default_url
from .trained_models import STARTUP_MODEL_ID
from .training_job import TrainingManager

__all__ = ["create_app"]

_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


async def validation_error_response(request: Request, exc: Exception) -> JSONResponse:
    """422 with FastAPI's ``{"detail": [{"loc", "msg", "type"}, ...]}`` shape, without echoing the
    offending input back: it may hold values JSON cannot encode (NaN) or be megabytes long."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [
        {
            "loc": [p if isinstance(p, (int, str)) else str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", ""))[:500],
            "type": str(e.get("type", "")),
        }
        for e in errors[:50]
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def _static_dir() -> Path:
    return Path(str(resources.files("medsam.server") / "static"))


def create_app(
    data_dir: str | Path,
    model: Any = None,
    token: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_image_voxels: int = DEFAULT_MAX_IMAGE_VOXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allowed_hosts: tuple[str, ...] | None = None,
    modality: str | None = None,
    model_window: str | tuple[float, float] | None = None,
    images_in_memory: int = 4,
    embeddings_in_memory: int = 64,
    train_threads: int | None = None,
    database: str | None = None,
    serve_startup_model: bool = True,
    encoder_url: str | None = None,
    encoder_token: str | None = None,
    model3d: Any = None,
) -> FastAPI:
    """The workbench app for the images in ``data_dir``.

    Args:
        data_dir: the datastore folder; labels go to ``data_dir/.medsam/labels``, embeddings to
            ``data_dir/.medsam/cache``.
        model: a loaded model; default: ``medsam.load_model(checkpoint)`` on first use.
        token: require ``Authorization: Bearer <token>`` on every API route.
        checkpoint: the checkpoint file (loaded when ``model`` is None; recorded in provenance).
        max_upload_bytes: upload size limit (default 512 MiB).
        max_image_voxels, max_image_bytes: largest pixel data an image's header may declare
            (uploads and reads; default 256 Mi voxels, 2 GiB).
        allowed_hosts: accepted ``Host`` names (default loopback names; ``("*",)`` = any).
        modality, model_window: model-input normalisation (see :class:`ServerSettings`).
        train_threads: CPU threads of a training job's process (default: half the cores).
        database: SQLAlchemy URL of the state database (labels' versions and history,
            uncertainty scores, jobs, training jobs, the served model); default SQLite in
            ``data_dir/.medsam/state.sqlite3``. Every server process of one data folder must name
            the same database.
        serve_startup_model: record the start-up model as the served one, so that every process
            on the database serves it (a server starts with the model it was given); the worker
            processes of ``medsam serve --workers N`` leave this to their parent.
        encoder_url, encoder_token: an encoder service that computes the embeddings
            (:mod:`medsam.server.encoder_service`); it must serve the same encoder as ``model``.
        model3d: a loaded SAM-Med3D model for ``POST /segment3d`` (voxel clicks on volumes).
    """
    root = Path(data_dir).expanduser().resolve(strict=True)
    if not root.is_dir():
        raise NotADirectoryError(f"data folder is not a folder: {root}")
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        raise ValueError("the token must be at least 8 printable characters without spaces")
    ckpt = Path(checkpoint).expanduser().resolve() if checkpoint else None
    if model is None and ckpt is None:
        from ..default_model import bundled_checkpoint

        ckpt = bundled_checkpoint()
    settings = ServerSettings(
        data_dir=root,
        token=token,
        max_upload_bytes=int(max_upload_bytes),
        max_image_voxels=int(max_image_voxels),
        max_image_bytes=int(max_image_bytes),
        allowed_hosts=tuple(allowed_hosts)
        if allowed_hosts
        else ServerSettings.__dataclass_fields__["allowed_hosts"].default,
        modality=modality,
        model_window=model_window,
        checkpoint=ckpt,
        images_in_memory=images_in_memory,
        embeddings_in_memory=embeddings_in_memory,
        database_url=database or default_url(root / STATE_DIR),
    )
    if model is None:
        chosen = checkpoint

        def loader():
            from ..weights import load_model

            return load_model(chosen)

        model_source: Any = loader
    else:
        model_source = model
    datastore = Datastore(settings)
    db = StateDatabase(settings.database_url)
    label_store = LabelStore(settings.labels_dir, root, db)
    label_store.migrate()
    remote = RemoteEncoder(encoder_url, encoder_token) if encoder_url else None
    engine = SegmentationEngine(model_source, settings.cache_dir, ckpt, embeddings_in_memory, remote)
    job_manager = JobManager(db)
    shared_training = SharedTraining(db, job_manager.worker)
    if serve_startup_model:
        shared_training.set_served(STARTUP_MODEL_ID)
    workbench = Workbench(
        settings=settings,
        datastore=datastore,
        labels=label_store,
        engine=engine,
        jobs=job_manager,
        uncertainty=UncertaintyStore(db),
        training=TrainingManager(
            settings,
            datastore,
            label_store,
            engine,
            threads=train_threads,
            shared=shared_training,
        ),
        sessions=SessionStore(settings.state_dir, datastore),
        native3d=Native3DEngine(model3d) if model3d is not None else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        workbench.training.shutdown()
        workbench.jobs.shutdown()
        db.dispose()

    from .. import __version__

    app = FastAPI(
        title="MedSAM workbench",
        version=__version__,
        description="Annotate medical images with MedSAM: prompts, labels, propagation, active learning, "
        "fine-tuning on the accepted labels.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.workbench = workbench
    app.add_exception_handler(RequestValidationError, validation_error_response)

    @app.exception_handler(EncoderServiceError)
    async def encoder_unavailable(request: Request, exc: EncoderServiceError) -> JSONResponse:
        return JSONResponse(status_code=502, content={"detail": str(exc)})

    # Order matters for the path-style ids: the specific /images/{id}/embeddings first.
    for module in (
        embeddings,
        images,
        segment,
        segment3d,
        auto,
        labels,
        propagate,
        next_router,
        jobs,
        train,
        monailabel,
    ):
        app.include_router(module.router)

    @app.get("/info", response_model=ServerInfo, tags=["server"], summary="Model, limits and counters")
    def info(wb: WorkbenchDep) -> ServerInfo:
        stats = wb.engine.stats()
        return ServerInfo(
            name="medsam-workbench",
            version=__version__,
            model=wb.engine.model_info(),
            token_required=wb.settings.token is not None,
            max_upload_bytes=wb.settings.max_upload_bytes,
            upload_suffixes=list(UPLOAD_SUFFIXES),
            encoder_calls=stats["encoder_calls"],
            cache_hits=stats["cache_hits"],
            process_id=os.getpid(),
            model3d=None if wb.native3d is None else wb.native3d.info(),
        )

    static = _static_dir()
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html")

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", _CSP)
        return response

    # Outermost: Host allow-list and token, before anything else runs.
    app.add_middleware(
        TokenAndHostMiddleware,
        token=token,
        allowed_hosts=settings.allowed_hosts,
        max_body_bytes=settings.max_upload_bytes + (1 << 20),
    )  # uploads meet their own limit first
    return app
