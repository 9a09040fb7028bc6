"""The workbench as one process or several: ``ServeConfig`` and the app each process builds from it.

With ``medsam serve --workers N`` uvicorn starts N processes on one listening socket; each loads
the model and builds its app with :func:`app_from_environment` from the :class:`ServeConfig` the
parent put in the environment variable ``MEDSAM_SERVE_CONFIG`` (JSON; the token travels there
too, never on a command line). Their shared state is the data folder and the state database
(:mod:`medsam.server.state_db`), so any of them answers any request: label versions, history,
uncertainty scores and jobs are the same from every process. Several machines sharing the data
folder run one ``medsam serve`` each with the same ``--database`` (PostgreSQL) behind one proxy.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CONFIG_ENV", "ServeConfig", "app_from_environment", "build_app", "prepare_state"]

CONFIG_ENV = "MEDSAM_SERVE_CONFIG"


class ModelNotServable(ValueError):
    """The checkpoint is of a family the workbench does not serve."""


@dataclass(frozen=True)
class ServeConfig:
    """What ``medsam serve`` builds a server process from (see :func:`medsam.server.create_app`)."""

    data: str
    checkpoint: str | None = None
    device: str | None = None
    token: str | None = None
    max_upload_bytes: int = 512 * 1024 * 1024
    max_image_voxels: int = 256 * 1024 * 1024
    allowed_hosts: tuple[str, ...] = ()
    modality: str | None = None
    window: str | tuple[float, float] | None = None
    database: str | None = None
    encoder_url: str | None = None
    encoder_token: str | None = None
    model3d: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        raw: dict[str, Any] = json.loads(text)
        raw["allowed_hosts"] = tuple(raw.get("allowed_hosts") or ())
        if isinstance(raw.get("window"), list):
            raw["window"] = tuple(float(v) for v in raw["window"])
        return cls(**raw)


def build_app(config: ServeConfig, worker: bool = False):
    """Load the model and build the app of one server process (``worker``: one of several
    started together, which leaves recording the served model to :func:`prepare_state`).

    Raises :class:`ModelNotServable` for a SAM-Med3D checkpoint."""
    from ..default_model import bundled_checkpoint
    from ..model.sam_med3d import SamMed3DModel
    from ..weights import load_model
    from .app import create_app

    model = load_model(config.checkpoint, device=config.device)
    if isinstance(model, SamMed3DModel):
        raise ModelNotServable(
            "the workbench's --checkpoint is a SAM / MedSAM / SAM2-family model; give SAM-Med3D with --model3d"
        )
    model3d = None
    if config.model3d:
        model3d = load_model(config.model3d, device=config.device)
        if not isinstance(model3d, SamMed3DModel):
            raise ModelNotServable(f"--model3d takes a SAM-Med3D checkpoint, not {type(model3d).__name__}")
    checkpoint = config.checkpoint
    if checkpoint is None and not getattr(model, "is_untrained_default", False):
        checkpoint = str(bundled_checkpoint())
    return create_app(
        config.data,
        model=model,
        token=config.token,
        checkpoint=checkpoint,
        max_upload_bytes=config.max_upload_bytes,
        max_image_voxels=config.max_image_voxels,
        allowed_hosts=config.allowed_hosts or None,
        modality=config.modality,
        model_window=config.window,
        database=config.database,
        serve_startup_model=not worker,
        encoder_url=config.encoder_url,
        encoder_token=config.encoder_token,
        model3d=model3d,
    )


def prepare_state(config: ServeConfig) -> None:
    """Create the state database's tables, bring the labels folder up to date and record the
    start-up model as served, once, before the worker processes start."""
    from pathlib import Path

    from .labels import LabelStore
    from .settings import STATE_DIR
    from .shared_training import SharedTraining
    from .state_db import StateDatabase, default_url
    from .trained_models import STARTUP_MODEL_ID

    root = Path(config.data).expanduser().resolve(strict=True)
    db = StateDatabase(config.database or default_url(root / STATE_DIR))
    try:
        LabelStore(root / STATE_DIR / "labels", root, db).migrate()
        SharedTraining(db, "medsam serve").set_served(STARTUP_MODEL_ID)
    finally:
        db.dispose()


def app_from_environment():
    """uvicorn's app factory in each worker process: :func:`build_app` of ``$MEDSAM_SERVE_CONFIG``."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start worker processes with medsam serve --workers N")
    return build_app(ServeConfig.from_json(text), worker=True)
