"""``medsam demo``: segment the bundled sample images with the embedded default model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .runner import log

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="segment the bundled sample images with the embedded default model")
    p.add_argument("-o", "--output", default="demo-output", help="folder for the results")
    p.add_argument("--no-zoom", action="store_true", help="do not segment small 2D boxes on a magnified crop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    report = run_demo(args.output, log=log, zoom=not args.no_zoom)
    print(f"wrote {report}")
    return 0
