"""Work split by item on Dask: worker processes on this machine, or a cluster named by its
scheduler's address.

    with DaskEngine(workers=4) as engine:                       # a local cluster of 4 processes
        for item, result, error in engine.map(fn, items): ...
    with DaskEngine(scheduler="tcp://head:8786") as engine: ... # a running Dask cluster

Why Dask (``dask.distributed``) rather than Ray: the work here is a list of independent,
coarse items (a case to curate, a shard to write, a slice stack to embed) whose results are small
records; Dask's futures do exactly that with per-task retries, run from pure-Python wheels, start a
local cluster in about a second on two cores, and reach a cluster through one address (SSH,
SLURM through ``dask-jobqueue``, Kubernetes). Ray's wheel, its object store and its per-node
daemons bring nothing this workload needs.

Each item is one task: a task whose worker dies is retried (``retries``) on another worker, and
an item's function should report its own failures in its result, so that one bad item never
stops the others. Items that write files must write them where every worker sees them (a shared
file system on a cluster). Results arrive as tasks finish, not in item order.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["DaskEngine", "EngineUnavailable"]


class EngineUnavailable(RuntimeError):
    """Dask is not installed, or the scheduler cannot be reached."""


class DaskEngine:
    """A Dask client on a local cluster (``workers`` processes of one thread each) or on the
    cluster of ``scheduler``; a context manager that closes what it started.

    Args:
        workers: local worker processes (ignored with ``scheduler``).
        scheduler: address of a running scheduler, e.g. ``tcp://10.0.0.5:8786``.
        retries: times a task is run again after its worker died.
        threads: CPU threads each task may use (set in the worker before each item: torch,
            SimpleITK).
    """

    def __init__(self, workers: int = 2, scheduler: str | None = None, retries: int = 2, threads: int = 1) -> None:
        self.workers = max(1, int(workers))
        self.scheduler = scheduler
        self.retries = int(retries)
        self.threads = max(1, int(threads))
        self._cluster: Any = None
        self._client: Any = None

    def __enter__(self) -> DaskEngine:
        try:
            from distributed import Client, LocalCluster
        except ModuleNotFoundError as exc:
            raise EngineUnavailable(
                f"the Dask engine needs the cluster extra (pip install 'medsam[cluster]'): {exc}"
            ) from None
        try:
            if self.scheduler:
                self._client = Client(self.scheduler, timeout=30)
            else:
                self._cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.CRITICAL,  # task errors come back through the futures
                )
                self._client = Client(self._cluster)
        except OSError as exc:
            self.close()
            raise EngineUnavailable(f"cannot reach the Dask scheduler {self.scheduler}: {exc}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        client, cluster, self._client, self._cluster = self._client, self._cluster, None, None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    @property
    def n_workers(self) -> int:
        """Workers the scheduler knows now."""
        return len(self._client.scheduler_info()["workers"]) if self._client is not None else 0

    def map(
        self, fn: Callable[[Any], Any], items: Sequence[Any], name: str = "medsam"
    ) -> Iterator[tuple[Any, Any, BaseException | None]]:
        """Run ``fn(item)`` for every item; yields ``(item, result, None)`` or ``(item, None,
        error)`` as tasks finish. Leaving the loop early cancels the tasks not yet finished."""
        from distributed import as_completed

        if self._client is None:
            raise RuntimeError("use DaskEngine as a context manager")
        if not items:
            return
        futures = self._client.map(
            _run_item,
            [fn] * len(items),
            list(items),
            [self.threads] * len(items),
            key=[f"{name}-{k}" for k in range(len(items))],
            retries=self.retries,
            pure=False,
        )
        index = {f.key: k for k, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                item = items[index[fut.key]]
                try:
                    yield item, fut.result(), None
                except Exception as exc:  # the task raised, or its workers kept dying
                    yield item, None, exc
        finally:
            self._client.cancel([f for f in futures if not f.done()])


def _run_item(fn: Callable[[Any], Any], item: Any, threads: int) -> Any:
    """One task in a worker: the thread counts of torch and SimpleITK set (where the worker has
    imported them), then ``fn(item)``."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk = sys.modules.get("SimpleITK")
    if sitk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    result = fn(item)
    sitk = sys.modules.get("SimpleITK")
    if sitk is not None:  # imported by the item: set for the next one
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return result
