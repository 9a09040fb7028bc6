"""Which model a workbench process serves: the start-up model or one a training job made.

:class:`ServedModels` is the part of :class:`medsam.server.training_job.TrainingManager` that
lists the models (:func:`medsam.server.trained_models.model_entries`), switches the served one
(``POST /train/models/select``, or a finished job), and with a state database records the choice
for every process and follows a choice made through another (:meth:`ServedModels.sync_served`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from .shared_training import SharedTraining
from .trained_models import JOB_ID_RE, STARTUP_MODEL_ID, model_entries, trained_records

__all__ = ["ServedModels", "TrainingRefused"]

log = logging.getLogger("medsam.server")


class TrainingRefused(Exception):
    """A request the training API answers with ``status`` (404, 409, 422) and this message."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServedModels:
    """Mixin of the training manager: the served model (see the module docstring)."""

    engine: Any
    settings: Any
    models_dir: Path
    served: str
    shared: SharedTraining | None
    _startup_model: Any
    _startup_checkpoint: Path | None
    _lock: threading.Lock
    _switching: threading.Lock
    _jobs: MutableMapping[str, Any]
    _unloadable: str | None = None  # the served id this process could not load (warned once)

    def active_job(self) -> Any:
        raise NotImplementedError

    def models(self) -> list[dict]:
        """The startup model and every finished training's model, oldest first
        (:func:`medsam.server.trained_models.model_entries`)."""
        from ..embedding_cache import model_fingerprint

        fp = self.engine.fingerprint() if self.served == STARTUP_MODEL_ID else model_fingerprint(self._startup_model)
        ckpt = self._startup_checkpoint
        return model_entries(str(ckpt) if ckpt else None, fp, self._trained_records(), self.served)

    def _trained_records(self) -> list[dict]:
        return trained_records(self.models_dir, self.settings.data_dir)

    def select(self, model_id: str) -> None:
        """Serve the model ``model_id`` (404 unknown, 409 while a job runs)."""
        refused = TrainingRefused("a training job is running; switch models after it ends", 409)
        if self.active_job() is not None:
            raise refused
        if model_id == self.served:
            return
        model, path = None, self._startup_checkpoint
        if model_id != STARTUP_MODEL_ID:
            if not JOB_ID_RE.match(model_id) or not any(r["id"] == model_id for r in self._trained_records()):
                raise TrainingRefused(f"no model {model_id!r}", 404)
            from ..weights import load_model

            path = self.models_dir / model_id / "model.safetensors"
            try:
                model = load_model(path, device=self.engine.model.device)
            except Exception as exc:  # a damaged file: say so, serve what was served
                raise TrainingRefused(
                    f"cannot load model {model_id!r}: {str(exc).splitlines()[0][:300]}", 500
                ) from None
        with self._lock:  # no job may start (or switch) in between
            if any(j.active for j in self._jobs.values()):
                raise refused
            self._switch(model_id, model, path)
            if self.shared is not None:
                self.shared.set_served(model_id)

    def _switch(self, model_id: str, model, checkpoint: Path | None) -> None:
        """Serve ``model`` (None for the start-up model) in this process."""
        if model_id == STARTUP_MODEL_ID:
            if self.served != STARTUP_MODEL_ID:
                self.engine.switch_model(self._startup_model, checkpoint)
                self.served = STARTUP_MODEL_ID
            return
        if self.served == STARTUP_MODEL_ID and self._startup_model is None:
            self._startup_model = self.engine.model
        self.engine.switch_model(model, checkpoint)
        self.served = model_id

    def _serve(self, model_id: str, model, checkpoint: Path) -> None:
        """Serve the model a training job made, in this process and (recorded) in every other."""
        self._switch(model_id, model, checkpoint)
        if self.shared is not None:
            self.shared.set_served(model_id)

    def sync_served(self) -> None:
        """Serve the model the state database records as served, if another process switched."""
        if self.shared is None:
            return
        wanted = self.shared.served()
        if wanted is None or wanted == self.served or any(j.active for j in list(self._jobs.values())):
            return
        if wanted != STARTUP_MODEL_ID and not JOB_ID_RE.match(wanted):
            return  # not a model id this workbench writes
        with self._switching:
            if wanted == self.served:
                return
            model, path = None, self._startup_checkpoint
            if wanted != STARTUP_MODEL_ID:
                from ..weights import load_model

                path = self.models_dir / wanted / "model.safetensors"
                try:
                    model = load_model(path, device=self.engine.model.device)
                except Exception as exc:
                    if self._unloadable != wanted:
                        self._unloadable = wanted
                        log.warning("cannot serve model %s that another process serves: %s", wanted, exc)
                    return
            with self._lock:
                self._switch(wanted, model, path)
