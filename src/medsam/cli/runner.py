"""How every ``medsam`` command runs: one error shape, signals, warnings, the threading policy.

The threading policy (:mod:`medsam.cpu_threads`) is set before a command imports torch: idle
OpenMP threads sleep, and torch uses as many threads as there are free cores. A process that
imported torch before calling :func:`medsam.cli.main` keeps its own thread settings.

Expected failures (bad arguments or input, unreadable files, refused checkpoints) print one line
``medsam: error: ...`` on stderr and exit with status 2: no traceback, and no output file (outputs
are written atomically at the end). An unexpected failure prints one line naming it and exits 1.
Ctrl-C exits 130, SIGTERM/SIGHUP ``128 + signal`` after the run's ``finally`` blocks removed what
was half-written (:mod:`medsam.lifecycle`). Warnings print as ``medsam: warning: ...``, one line
each. ``MEDSAM_DEBUG=1`` lets tracebacks through.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO

__all__ = ["EXIT_BAD_INPUT", "EXIT_UNEXPECTED", "CLIError", "log", "run_command"]

EXIT_BAD_INPUT = 2
EXIT_UNEXPECTED = 1


class CLIError(Exception):
    """An expected failure with a message for the user."""


def log(message: str) -> None:
    """A progress or warning line on stderr (results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


# Failures a user can cause and fix. RuntimeError covers the library's environment failures
# (ExportError, DemoSourceError) and torch's (out of memory, no CUDA device).
_EXPECTED = (CLIError, ValueError, OSError, RuntimeError)


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    message = " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename and str(filename) not in message:
        message = f"{message}: {filename}"
    return message


def _format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = str(message).strip()
    print(
        f"medsam: warning: {text.splitlines()[0] if text else category.__name__}",
        file=sys.stderr if file is None else file,
    )


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def run_command(func: Callable[[object], int | None], args: object) -> int:
    """Run one sub-command (``func(args)``) with the rules of the module docstring; returns the
    exit status. ``args.resume_hint``, when a command sets it, is added to the interruption line."""
    import warnings

    from ..cpu_threads import prepare
    from ..lifecycle import Terminated, install_termination_handler

    install_termination_handler()
    if "torch" not in sys.modules:  # a host process that already imported torch keeps its threads
        prepare()  # before any command imports torch: sleeping OpenMP waits, threads = free cores
    debug = bool(os.environ.get("MEDSAM_DEBUG"))
    if not debug:
        warnings.showwarning = _format_warning
    hint = getattr(args, "resume_hint", None)
    hint = f"; {hint}" if hint else ""
    try:
        return int(func(args) or 0)
    except Terminated as exc:
        log(f"medsam: stopped by {_signal_name(exc.signum)}{hint}")
        return 128 + int(exc.signum)
    except KeyboardInterrupt:
        log(f"medsam: interrupted{hint}")
        return 130
    except _EXPECTED as exc:
        if debug:
            raise
        log(f"medsam: error: {_error_line(exc)}")
        return EXIT_BAD_INPUT
    except ImportError as exc:
        if debug:
            raise
        log(
            f"medsam: error: a package this command needs is missing ({_error_line(exc)}); "
            "install the extra named in the command's --help"
        )
        return EXIT_BAD_INPUT
    except Exception as exc:
        if debug:
            raise
        log(f"medsam: error: unexpected {type(exc).__name__}: {_error_line(exc)} (MEDSAM_DEBUG=1 shows the traceback)")
        return EXIT_UNEXPECTED
