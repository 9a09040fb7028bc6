"""CPU threads for torch: as many as there are free cores, and idle ones that sleep.

On a machine shared with other processes (a workstation, CI, a server answering two requests),
OpenMP threads that spin-wait for a sibling the OS has descheduled waste whole time slices, and
more threads than free cores make every parallel region wait for its slowest thread. The policy,
measured in docs/performance.md ("Threads under load"):

* **Wait policy**: idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``).
  libgomp reads it once, when torch is imported, so :func:`prepare` must run before that.
* **Thread count**: the cores this process may use (CPU affinity) minus those other processes
  keep busy, measured from ``/proc/stat`` over a short window, at least 1.

A value the user set (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, or ``MEDSAM_THREADS``, which wins)
is never overridden. The command line calls :func:`prepare` when a command starts; the workbench
calls :func:`adapt` before each computation so the count follows the load. A library user calls
``medsam.cpu_threads.prepare()`` before importing torch (or sets the variables), then
:func:`apply` (or :func:`adapt`) whenever the load may have changed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["THREADS_ENV", "CpuSample", "adapt", "apply", "free_cores", "prepare", "usable_cores"]

THREADS_ENV = "MEDSAM_THREADS"
_WINDOW_S = 0.1  # a fresh measurement's window; /proc/stat counts in 10 ms ticks
_ADAPT_EVERY_S = 1.0


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy CPU time and this process's own CPU time at one moment (seconds)."""

    wall: float
    busy: float | None  # all processes, all cores; None where /proc/stat is not readable
    own: float


def sample() -> CpuSample:
    """The current :class:`CpuSample`."""
    busy = None
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            busy = (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = None
    t = os.times()
    return CpuSample(time.monotonic(), busy, t.user + t.system)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def free_cores(since: CpuSample | None = None) -> int:
    """Usable cores minus the cores other processes kept busy since ``since`` (a window of
    :data:`_WINDOW_S` is measured now when ``since`` is None or too recent); at least 1."""
    cores = usable_cores()
    if since is None or time.monotonic() - since.wall < _WINDOW_S / 2:
        since = sample()
        time.sleep(_WINDOW_S)
    now = sample()
    if since.busy is None or now.busy is None or now.wall <= since.wall:
        return cores
    others = ((now.busy - since.busy) - (now.own - since.own)) / (now.wall - since.wall)
    return max(1, min(cores, cores - int(round(max(0.0, others)))))


def _env_threads(*names: str) -> int | None:
    """The first positive thread count set in the environment variables ``names``."""
    for name in names:
        text = os.environ.get(name, "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def _explicit_threads() -> int | None:
    return _env_threads(THREADS_ENV, "OMP_NUM_THREADS")


def prepare() -> int:
    """Set the OpenMP environment before torch is imported: sleeping waits and the free cores as
    ``OMP_NUM_THREADS`` (unless the user set them); returns the thread count chosen. When torch is
    already imported, the count is applied through torch instead (the wait policy cannot change
    any more then)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = _explicit_threads() or free_cores()
    if "torch" in sys.modules:
        return apply(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    return threads


def apply(threads: int | None = None) -> int:
    """``torch.set_num_threads`` to ``threads`` (default: ``MEDSAM_THREADS``, else the free cores
    measured now); returns the count."""
    import torch

    n = max(1, threads or _env_threads(THREADS_ENV) or free_cores())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


_adapt_lock = threading.Lock()
_last: CpuSample | None = None
_chosen: int | None = None


def adapt(background: bool = False) -> int:
    """For long-running processes (the workbench): re-measure the free cores over the time since
    the last measurement (at most once a second, so a call costs a file read) and give the
    calling thread that many torch threads; an explicit ``MEDSAM_THREADS`` is kept. Returns the
    count in force. (With OpenMP the count is per calling thread: a server's request threads each
    take it on their next call.) ``background``: work nobody waits on (a volume propagating, an
    embedding warm-up) leaves one of the free cores to interactive requests when it can."""
    global _last, _chosen
    import torch

    if _env_threads(THREADS_ENV) is not None:
        return apply()
    since = None
    with _adapt_lock:
        now = sample()
        if _last is None:
            _last = now
        elif now.wall - _last.wall >= _ADAPT_EVERY_S:
            since, _last = _last, now
    if since is not None:
        _chosen = free_cores(since)
    n = _chosen or torch.get_num_threads()
    if background and n > 1:
        n -= 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
