"""Fine-tuning state that every server process of one data folder shares, in the state database.

One training job runs at a time across all processes: :meth:`SharedTraining.claim` records a job
only when no other process has an active one (in one serialised transaction). The process running
it publishes its status (:meth:`publish`, the same dict ``GET /train/jobs/{id}`` answers) and picks
up cancel requests made through any process (:meth:`cancel_requested`). Which model is served is
``meta["served_model"]``: a process that finds it different from the model it serves switches
before answering (:meth:`medsam.server.training_job.TrainingManager.sync_served`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .jobs import worker_gone
from .state_db import StateDatabase

__all__ = ["SERVED_KEY", "SharedTraining", "TrainingSnapshot"]

SERVED_KEY = "served_model"
_ACTIVE = ("queued", "running")
_KEEP = 50


@dataclass
class TrainingSnapshot:
    """A training job as another process last published it (answers like a ``TrainingJob``)."""

    id: str
    state: str
    _info: dict[str, Any]

    @property
    def active(self) -> bool:
        return self.state in _ACTIVE

    def info(self, tail: int = 40) -> dict[str, Any]:
        out = dict(self._info)
        out["log_tail"] = list(out.get("log_tail") or [])[-tail:]
        return out


class SharedTraining:
    """The ``training_jobs`` table and the served model's record."""

    def __init__(self, db: StateDatabase, worker: str) -> None:
        self.db = db
        self.worker = worker

    def claim(self, job_id: str, created: str, info: dict[str, Any]) -> str | None:
        """Record job ``job_id`` as queued, unless another job is active: then return its id."""
        from sqlalchemy import delete, insert, select, update

        t = self.db.training
        with self.db.write_image("\0training") as conn:
            for running, worker in conn.execute(select(t.c.id, t.c.worker).where(t.c.state.in_(_ACTIVE))).all():
                if not worker_gone(worker):
                    return str(running)
                conn.execute(update(t).where(t.c.id == running).values(state="failed"))  # its process ended
            conn.execute(
                insert(t).values(
                    id=job_id, created=created, state="queued", info=info, cancel_requested=False, worker=self.worker
                )
            )
            old = select(t.c.created).order_by(t.c.created.desc()).offset(_KEEP).limit(1).scalar_subquery()
            conn.execute(delete(t).where(t.c.created <= old, t.c.state.not_in(_ACTIVE)))
        return None

    def publish(self, job_id: str, state: str, info: dict[str, Any]) -> bool:
        """Store the job's status; returns whether a cancel request is recorded for it."""
        from sqlalchemy import select, update

        t = self.db.training
        with self.db.write() as conn:
            conn.execute(update(t).where(t.c.id == job_id).values(state=state, info=info))
            return bool(conn.execute(select(t.c.cancel_requested).where(t.c.id == job_id)).scalar())

    def request_cancel(self, job_id: str) -> None:
        from sqlalchemy import update

        t = self.db.training
        with self.db.write() as conn:
            conn.execute(update(t).where(t.c.id == job_id, t.c.state.in_(_ACTIVE)).values(cancel_requested=True))

    def get(self, job_id: str) -> TrainingSnapshot | None:
        from sqlalchemy import select

        t = self.db.training
        with self.db.read() as conn:
            row = conn.execute(select(t.c.id, t.c.state, t.c.info).where(t.c.id == job_id)).first()
        return None if row is None else TrainingSnapshot(str(row[0]), str(row[1]), dict(row[2]))

    def all(self) -> list[TrainingSnapshot]:
        """Every kept job, oldest first."""
        from sqlalchemy import select

        t = self.db.training
        with self.db.read() as conn:
            rows = conn.execute(select(t.c.id, t.c.state, t.c.info).order_by(t.c.created, t.c.id)).all()
        return [TrainingSnapshot(str(i), str(s), dict(info)) for i, s, info in rows]

    def active(self) -> TrainingSnapshot | None:
        """The job queued or running in any process, if one is."""
        from sqlalchemy import select

        t = self.db.training
        with self.db.read() as conn:
            row = conn.execute(select(t.c.id, t.c.state, t.c.info).where(t.c.state.in_(_ACTIVE)).limit(1)).first()
        return None if row is None else TrainingSnapshot(str(row[0]), str(row[1]), dict(row[2]))

    def served(self) -> str | None:
        """The id of the model every process serves (None: the start-up model, never switched)."""
        return self.db.get_meta(SERVED_KEY)

    def set_served(self, model_id: str) -> None:
        with self.db.write() as conn:
            self.db.set_meta(conn, SERVED_KEY, model_id)
