"""The ``medsam`` command: a thin layer over the library, one module per command.

Each command module has ``add_parser(subparsers)``, which registers its sub-command(s) with a
``func`` that parses nothing further and calls the library; :func:`main` runs it through
:func:`medsam.cli.runner.run_command` (one error line and exit status 2 for bad input, signals,
warnings). Importing this package or a command module imports neither torch nor the library, so
``--help`` and argument errors answer at once.

``python -m medsam ...`` and ``python -m medsam.cli ...`` are the same as ``medsam ...`` (also
under ``torchrun``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import NoReturn

from .runner import CLIError, run_command

__all__ = ["COMMAND_MODULES", "CLIError", "build_parser", "main", "run_command"]

# The command modules, in the order their commands are listed by --help.
COMMAND_MODULES = (
    "segment",
    "evaluate",
    "info",
    "models",
    "demo",
    "prepare",
    "train",
    "benchmark",
    "onnx",
    "serve",
    "specialist",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the command's error shape: ``medsam: error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        from .runner import EXIT_BAD_INPUT, log

        log(f"medsam: error: {message} (see: {self.prog} --help)")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """The ``medsam`` argument parser with every command registered."""
    from .. import __version__

    parser = ArgumentParser(prog="medsam", description="MedSAM: Segment Anything for medical images")
    parser.add_argument("--version", action="version", version=f"medsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments) and run the command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argument error already reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args)
