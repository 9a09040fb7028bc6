"""Background jobs with progress: one worker thread per server process, started on first use,
stopped with the app; every job's state in the state database, so any server process answers.

A job is a function ``work(job)`` that reports progress through ``job.progress(done, total)``,
may check ``job.cancelled`` and returns a JSON-able ``dict`` (the job's ``result``). A process runs
its own jobs one at a time in submission order (the model is shared anyway). The ``jobs`` table
(:mod:`medsam.server.state_db`) holds each job's status, progress, result and a cancel request;
a job is written there when submitted, when it starts, at its progress reports (at most five a
second) and when it ends, and a cancel request made through another process reaches it at its
next stored report. Finished jobs are
kept (the last 200). A job left active by a server process of this machine that no longer runs
is marked failed when a server starts.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from .labels import now_iso
from .state_db import StateDatabase

__all__ = ["Job", "JobFailed", "JobListing", "JobManager", "worker_gone"]

_KEEP_FINISHED = 200
_ACTIVE = ("queued", "running")
_REPORT_EVERY_S = 0.2
_LIVE_MANAGERS: set[str] = set()  # the workers of this process's managers not shut down


class JobFailed(RuntimeError):
    """Raise inside a job to fail it with an HTTP-like status (e.g. 409 for a version conflict)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    kind: str
    image_id: str | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    status: str = "queued"
    done: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    error_status: int | None = None
    result: dict | None = None
    created: str = field(default_factory=now_iso)
    finished: str | None = None
    cancelled: bool = False
    _report: Callable[[Job], None] | None = field(default=None, repr=False, compare=False)

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.done, self.total = int(done), int(total)
        if message:
            self.message = message
        if self._report is not None:
            self._report(self)

    def info(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "image_id": self.image_id,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "error": self.error,
            "error_status": self.error_status,
            "result": self.result,
            "created": self.created,
            "finished": self.finished,
        }

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


class _Cancellable(Protocol):
    cancelled: bool

    @property
    def active(self) -> bool: ...


JobT = TypeVar("JobT", bound=_Cancellable)


class JobListing(Generic[JobT]):
    """What a job manager answers about its jobs: ``_jobs`` (id -> job, in creation order),
    guarded by ``_lock``. Cancelling marks an active job; :meth:`_cancelled` is the manager's
    further step (stopping a process)."""

    _jobs: MutableMapping[str, JobT]
    _lock: threading.Lock

    def get(self, job_id: str) -> JobT | None:
        return self._jobs.get(job_id)

    def all(self) -> list[JobT]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> JobT | None:
        job = self._jobs.get(job_id)
        if job is not None and job.active:
            job.cancelled = True
            self._cancelled(job)
        return job

    def _cancelled(self, job: JobT) -> None:
        """Called after ``job`` was marked cancelled."""


class JobManager:
    """Runs this process's jobs on one lazily created worker thread and keeps every job's state in
    ``db``; :meth:`shutdown` cancels this process's queued and running jobs."""

    def __init__(self, db: StateDatabase) -> None:
        self.db = db
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._live: dict[str, Job] = {}  # this process's jobs that have not ended
        self._reported: dict[str, float] = {}  # job id -> time of its last stored progress
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._fail_orphans()
        _LIVE_MANAGERS.add(self.worker)

    # ------------------------------------------------------------------ rows
    def _row(self, job: Job) -> dict[str, Any]:
        return {
            "kind": job.kind,
            "image_id": job.image_id,
            "status": job.status,
            "done": job.done,
            "total": job.total,
            "message": job.message,
            "error": job.error,
            "error_status": job.error_status,
            "result": job.result,
            "created": job.created,
            "finished": job.finished,
        }

    @staticmethod
    def _job(row: Mapping[str, Any]) -> Job:
        job = Job(row["kind"], row["image_id"], id=row["id"], status=row["status"], created=row["created"])
        job.done, job.total, job.message = int(row["done"]), int(row["total"]), row["message"]
        job.error, job.error_status, job.result = row["error"], row["error_status"], row["result"]
        job.finished, job.cancelled = row["finished"], bool(row["cancel_requested"])
        return job

    def _store(self, job: Job) -> bool:
        """Write ``job``'s state; returns whether a cancel request is recorded for it."""
        from sqlalchemy import select, update

        t = self.db.jobs
        with self.db.write() as conn:
            conn.execute(update(t).where(t.c.id == job.id).values(**self._row(job)))
            return bool(conn.execute(select(t.c.cancel_requested).where(t.c.id == job.id)).scalar())

    def _report(self, job: Job) -> None:
        """A progress report: stored (and a cancel request looked for) at most every
        :data:`_REPORT_EVERY_S` seconds per job; the end of a job is always stored."""
        now = time.monotonic()
        if now - self._reported.get(job.id, -1e9) < _REPORT_EVERY_S:
            return
        self._reported[job.id] = now
        if self._store(job):
            job.cancelled = True

    # ------------------------------------------------------------------ submitting and running
    def submit(self, kind: str, image_id: str | None, work: Callable[[Job], dict]) -> Job:
        from sqlalchemy import func, insert, select

        job = Job(kind, image_id, _report=self._report)
        t = self.db.jobs
        with self.db.write() as conn:
            seq = int(conn.execute(select(func.coalesce(func.max(t.c.seq), 0))).scalar() or 0) + 1
            conn.execute(
                insert(t).values(id=job.id, seq=seq, cancel_requested=False, worker=self.worker, **self._row(job))
            )
        self._trim()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsam-job")
            self._live[job.id] = job
            self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], dict]) -> None:
        try:
            if job.cancelled or self._store(job):
                job.status, job.finished = "cancelled", now_iso()
                return
            job.status = "running"
            self._store(job)
            try:
                job.result = work(job)
                job.status = "cancelled" if job.cancelled else "done"
            except JobFailed as exc:
                job.status, job.error, job.error_status = "failed", str(exc), exc.status
            except Exception as exc:  # a failed job must not kill the worker
                job.status, job.error, job.error_status = "failed", f"{type(exc).__name__}: {exc}", 500
            job.finished = now_iso()
        finally:
            try:
                self._store(job)
            finally:
                with self._lock:
                    self._live.pop(job.id, None)
                self._reported.pop(job.id, None)

    # ------------------------------------------------------------------ reading
    def get(self, job_id: str) -> Job | None:
        from sqlalchemy import select

        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            return live
        with self.db.read() as conn:
            row = conn.execute(select(self.db.jobs).where(self.db.jobs.c.id == job_id)).mappings().first()
        return None if row is None else self._job(row)

    def all(self) -> list[Job]:
        """Every kept job of every process, oldest first."""
        from sqlalchemy import select

        with self.db.read() as conn:
            rows = conn.execute(select(self.db.jobs).order_by(self.db.jobs.c.seq)).mappings().all()
        return [self._job(r) for r in rows]

    def latest(self, kind: str, image_id: str | None) -> Job | None:
        from sqlalchemy import select

        t = self.db.jobs
        with self.db.read() as conn:
            row = (
                conn.execute(
                    select(t)
                    .where(t.c.kind == kind, t.c.image_id.is_(None) if image_id is None else t.c.image_id == image_id)
                    .order_by(t.c.seq.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        with self._lock:
            return self._live.get(row["id"]) or self._job(row)

    def cancel(self, job_id: str) -> Job | None:
        """Record a cancel request for an active job (seen by the process running it at its next
        progress report; at once when that is this process); returns the job, None if unknown."""
        from sqlalchemy import update

        t = self.db.jobs
        with self.db.write() as conn:
            conn.execute(update(t).where(t.c.id == job_id, t.c.status.in_(_ACTIVE)).values(cancel_requested=True))
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            live.cancelled = True
            return live
        return self.get(job_id)

    # ------------------------------------------------------------------ housekeeping
    def shutdown(self) -> None:
        _LIVE_MANAGERS.discard(self.worker)
        with self._lock:
            for job in self._live.values():
                job.cancelled = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left = list(self._live.values())
        for job in left:  # queued jobs whose futures were cancelled
            job.status, job.finished = "cancelled", now_iso()
            self._store(job)

    def _trim(self) -> None:
        from sqlalchemy import delete, select

        t = self.db.jobs
        with self.db.write() as conn:
            old = (
                select(t.c.seq)
                .where(t.c.status.not_in(_ACTIVE))
                .order_by(t.c.seq.desc())
                .offset(_KEEP_FINISHED)
                .limit(1)
                .scalar_subquery()
            )
            conn.execute(delete(t).where(t.c.status.not_in(_ACTIVE), t.c.seq <= old))

    def _fail_orphans(self) -> None:
        """Mark failed the active jobs of server processes of this machine that no longer run."""
        from sqlalchemy import select, update

        t = self.db.jobs
        host = socket.gethostname()
        with self.db.write() as conn:
            rows = conn.execute(select(t.c.id, t.c.worker).where(t.c.status.in_(_ACTIVE))).all()
            dead = [job_id for job_id, worker in rows if worker_gone(worker, host)]
            if dead:
                conn.execute(
                    update(t)
                    .where(t.c.id.in_(dead))
                    .values(
                        status="failed",
                        error="the server process running it stopped",
                        error_status=500,
                        finished=now_iso(),
                    )
                )


def worker_gone(worker: str, host: str | None = None) -> bool:
    """Whether the server process ``worker`` (``host:pid:token``) of this ``host`` has ended."""
    rest = worker.split(":")
    if len(rest) < 3 or ":".join(rest[:-2]) != (host or socket.gethostname()):
        return False  # another machine's process: left to it
    try:
        pid = int(rest[-2])
    except ValueError:
        return False
    if pid == os.getpid():  # this process, or an earlier one that had its pid
        return worker not in _LIVE_MANAGERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
