"""Argument types and options shared by several commands (no heavy imports: torch stays unloaded)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from typing import TypeAlias

    from ..zoom import ZoomPolicy

    # What ``add_parser`` receives: the ``add_subparsers()`` action of the ``medsam`` parser
    # (generic in typeshed only, so the alias exists for the type checker alone).
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = [
    "add_contract_option",
    "add_dask_options",
    "add_zoom_options",
    "ct_window",
    "dask_scheduler",
    "finite_float",
    "non_negative_int",
    "positive_int",
    "zoom_choice",
]


def add_contract_option(parser: argparse.ArgumentParser, choices: Sequence[str] | None = None) -> None:
    """``--contract NAME``: override the checkpoint's preprocessing contract (``choices``: the
    contract names allowed, default all)."""
    from ..contract_names import CONTRACT_NAMES

    parser.add_argument(
        "--contract",
        choices=CONTRACT_NAMES if choices is None else choices,
        default=None,
        help="override the checkpoint's preprocessing contract",
    )


def add_dask_options(parser: argparse.ArgumentParser, task: str, workers: bool = True) -> None:
    """``--dask [SCHEDULER]`` (one Dask task per ``task``, on a local cluster or on the cluster of
    SCHEDULER) and, unless the command has its own, ``--workers N`` (the local cluster's size)."""
    parser.add_argument(
        "--dask",
        nargs="?",
        const="local",
        default=None,
        metavar="SCHEDULER",
        help=f"one Dask task per {task}: on a local cluster of --workers processes, or on the cluster whose "
        "scheduler address is given (tcp://HOST:8786; inputs and outputs on a file system every worker "
        "sees). Needs: pip install 'medsam[cluster]'",
    )
    if workers:
        parser.add_argument("--workers", type=positive_int, default=2, help="local Dask workers (default 2)")


def dask_scheduler(value: str | None) -> str | None:
    """The scheduler address of a ``--dask`` value (None for a local cluster or no Dask)."""
    return None if value in (None, "local") else value


def ct_window(text: str) -> str | tuple[float, float]:
    """``--window``: a preset name (soft_tissue, lung, brain, bone, liver) or ``LEVEL,WIDTH``."""
    if "," not in text:
        return text
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a name or LEVEL,WIDTH, got {text!r}") from None
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise argparse.ArgumentTypeError(f"LEVEL,WIDTH must be finite with WIDTH > 0, got {text!r}")
    return (level, width)


def add_zoom_options(
    parser: argparse.ArgumentParser, where: str = "", recipe: str = "on for 256 px models such as the embedded one"
) -> None:
    """``--zoom [CONTEXT]`` and ``--no-zoom`` (see :func:`zoom_choice`); ``where`` says what is
    zoomed (after "segment small boxes on a crop CONTEXT x the box's longest side (default 3)"),
    ``recipe`` when the model's recipe zooms."""
    parser.add_argument(
        "--zoom",
        type=finite_float,
        nargs="?",
        const=3.0,
        default=None,
        metavar="CONTEXT",
        help=f"segment small boxes on a crop CONTEXT x the box's longest side (default 3){where}; see "
        f"medsam.zoom. Without it: the model's recipe, as medsam.Predictor applies it ({recipe}, off otherwise)",
    )
    parser.add_argument("--no-zoom", action="store_true", help="never zoom (not even the 256 px models' default)")


def zoom_choice(args: argparse.Namespace) -> ZoomPolicy | Literal["auto"] | None:
    """The ``zoom`` the library takes from :func:`add_zoom_options`' arguments: None for
    ``--no-zoom``, a policy for ``--zoom [CONTEXT]``, ``"auto"`` (the model's recipe) for neither.
    Raises ``CLIError`` for both or a bad context."""
    from ..zoom import ZoomPolicy
    from .runner import CLIError

    if args.no_zoom and args.zoom is not None:
        raise CLIError("--zoom and --no-zoom exclude each other")
    if args.no_zoom:
        return None
    if args.zoom is None:
        return "auto"
    try:
        return ZoomPolicy(context=args.zoom)
    except ValueError as exc:
        raise CLIError(f"--zoom: {exc}") from None


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value
