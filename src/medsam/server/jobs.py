"""Background jobs with progress: one worker thread, started on first use, stopped with the app.

A job is a function ``work(job)`` that reports progress through ``job.progress(done, total)``,
may check ``job.cancelled`` and returns a JSON-able ``dict`` (the job's ``result``). Jobs run
one at a time in submission order (the model is shared anyway). Finished jobs are kept (the last
200) so that clients can read their result.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .labels import now_iso

__all__ = ["Job", "JobFailed", "JobListing", "JobManager"]

_KEEP_FINISHED = 200


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

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.done, self.total = int(done), int(total)
        if message:
            self.message = message

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


class JobManager(JobListing[Job]):
    """Runs jobs on one lazily created worker thread; :meth:`shutdown` cancels queued jobs."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, kind: str, image_id: str | None, work: Callable[[Job], dict]) -> Job:
        job = Job(kind, image_id)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsam-job")
            self._jobs[job.id] = job
            self._trim()
            self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], dict]) -> None:
        if job.cancelled:
            job.status, job.finished = "cancelled", now_iso()
            return
        job.status = "running"
        try:
            job.result = work(job)
            job.status = "cancelled" if job.cancelled else "done"
        except JobFailed as exc:
            job.status, job.error, job.error_status = "failed", str(exc), exc.status
        except Exception as exc:  # a failed job must not kill the worker
            job.status, job.error, job.error_status = "failed", f"{type(exc).__name__}: {exc}", 500
        job.finished = now_iso()

    def latest(self, kind: str, image_id: str | None) -> Job | None:
        with self._lock:
            found = [j for j in self._jobs.values() if j.kind == kind and j.image_id == image_id]
        return found[-1] if found else None

    def shutdown(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                if job.active:
                    job.cancelled = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for j in finished[: max(0, len(finished) - _KEEP_FINISHED)]:
            self._jobs.pop(j.id, None)
