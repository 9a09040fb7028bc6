"""Process lifetime: runs that end cleanly on a signal, and children that die with their parent.

* :func:`install_termination_handler` turns ``SIGTERM`` (and ``SIGHUP``) into
  :class:`Terminated`, a :class:`KeyboardInterrupt`, so a run stopped by ``kill`` or a job
  scheduler unwinds exactly as one stopped by Ctrl-C: ``finally`` blocks run, temporary files of
  atomic writes (:func:`medsam.io.atomic.atomic_output`) are removed, and nothing half-written
  is left where an output belongs.
* :func:`die_with_parent` makes a child process end when the process that started it ends, even
  when that one is killed with ``SIGKILL`` and cannot clean up: on Linux through
  ``prctl(PR_SET_PDEATHSIG)`` for a direct child, otherwise by a daemon thread that waits on the
  process (a pool worker started by a fork server, whose parent is the fork server: the fork
  server lives as long as its workers, so the workers must watch the run's main process).
* :func:`stop_process_pool` ends a :class:`concurrent.futures.ProcessPoolExecutor` now, without
  waiting for the tasks it is running.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

__all__ = ["PARENT_PID_ENV", "Terminated", "die_with_parent", "install_termination_handler", "stop_process_pool"]

# Set by a parent for a child that must not outlive it (see die_with_parent).
PARENT_PID_ENV = "MEDSAM_PARENT_PID"
_PR_SET_PDEATHSIG = 1


class Terminated(KeyboardInterrupt):
    """The run was asked to stop by a signal other than Ctrl-C (``signum`` says which)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def install_termination_handler() -> bool:
    """Raise :class:`Terminated` on ``SIGTERM``/``SIGHUP`` in the main thread; False (nothing
    done) when called from another thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, _raise_terminated)
    return True


def die_with_parent(parent_pid: int | None = None, signum: int = signal.SIGTERM) -> None:
    """End this process (with ``signum``) when process ``parent_pid`` ends.

    ``parent_pid``: the process this one must not outlive (default: the :data:`PARENT_PID_ENV`
    variable, else the current parent). When it is the direct parent, Linux's
    ``prctl(PR_SET_PDEATHSIG)`` does it; otherwise (a pool worker forked by a fork server, whose
    parent is that server) a daemon thread waits on the process (a pidfd where the OS has one,
    else a poll every half second). If the process is already gone, this one ends at once.
    """
    expected = parent_pid
    if expected is None:
        text = os.environ.get(PARENT_PID_ENV, "")
        expected = int(text) if text.isdigit() else os.getppid()
    if expected == os.getppid() and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0:
                if os.getppid() != expected:  # the parent died before the request took effect
                    os.kill(os.getpid(), signum)
                return
        except (OSError, AttributeError):
            pass
    _watch_process(expected, signum)


def _watch_process(pid: int, signum: int) -> None:
    """A daemon thread that sends ``signum`` to this process when process ``pid`` ends."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable when the process ends
    except (AttributeError, OSError):
        fd = None
        if not _exists(pid):
            os.kill(os.getpid(), signum)
            return

    def watch() -> None:
        if fd is not None:
            import select

            select.select([fd], [], [])
            os.close(fd)
        else:
            import time

            while _exists(pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="medsam-parent-watch", daemon=True).start()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_pool(pool: Any) -> None:
    """Cancel what a ``ProcessPoolExecutor`` has queued and terminate its workers now."""
    pool.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.terminate()
        except (OSError, ValueError, AttributeError):
            pass
