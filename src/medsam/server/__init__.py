"""The annotation workbench: a FastAPI server and a browser page over a folder of images.

    from medsam.server import create_app
    app = create_app("/data/study", token="s3cret")     # an ASGI app; nothing runs at import
    # uvicorn.run(app, host="127.0.0.1", port=8000)   or:  medsam serve --data /data/study

Needs the ``serve`` extra (``pip install 'medsam[serve]'``: FastAPI, uvicorn). Layout, one module
per idea:

    app.py         create_app: wires settings, state and the routers; the page under /
    settings.py    ServerSettings: data folder, token, upload limits, model input options
    security.py    bearer token (constant-time), Host allow-list, safe ids inside the data folder
    datastore.py   the image folder: listing, safe lookup, reading with an LRU, uploads
    state_db.py    StateDatabase: the shared state in SQL (SQLite or PostgreSQL, SQLAlchemy Core)
    labels.py      LabelStore: versioned label maps, atomic saves, provenance sidecars
    engine.py      SegmentationEngine: the model, slice embeddings (memory LRU + on-disk cache),
                   prompts -> masks, propagation, uncertainty for active learning
    encoder_service.py  the image encoder as a service of its own, and the workbench's client
    jobs.py        JobManager: background jobs (one worker thread per process) with progress
    training_job.py  TrainingManager: fine-tuning on the accepted labels (``medsam train`` in a
                   child process), held-out before/after scores
    served_models.py, shared_training.py  the served model and its switch; training shared by
                   the processes of one database
    workers.py     ServeConfig and the app of each process of ``medsam serve --workers N``
    encoding.py    masks <-> RLE / PNG, slices -> windowed PNG
    schemas.py     the typed request and response models (the OpenAPI schema)
    routers/       one router per resource: images, embeddings, segment, labels, propagate,
                   next (active learning), jobs, train
    static/        the page: plain HTML + JS, no build step
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'medsam.server' has no attribute {name!r}")
