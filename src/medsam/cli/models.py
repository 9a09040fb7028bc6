"""``medsam models``: the official checkpoints known by name, and fetching one into the cache."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="list the official checkpoints known by name; fetch one into the cache")
    p.add_argument("fetch", nargs="?", choices=("fetch",), help="download NAME into the cache (checked)")
    p.add_argument("name", nargs="?", default=None, help="the model to fetch (see the list)")
    p.add_argument("--offline", action="store_true", help="only look in the cache (also MEDSAM_OFFLINE=1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import REGISTRY, HubError, cache_dir, cached_path, fetch
    from .runner import CLIError

    if args.fetch:
        if args.name is None:
            raise CLIError("medsam models fetch NAME: give the model's name (medsam models lists them)")
        try:
            path = fetch(args.name, offline=args.offline or None)
        except HubError as exc:
            raise CLIError(str(exc)) from None
        print(path)
        return 0
    if args.name is not None:
        raise CLIError("to download a model: medsam models fetch NAME")
    print(f"cache: {cache_dir()}")
    for item in REGISTRY.values():
        try:
            state = "cached" if cached_path(item.name) is not None else "-"
        except HubError:
            state = "checksum mismatch"
        check = "sha256 known" if item.sha256 else "sha256 pinned at first download"
        where = item.url or f"by hand from {item.page}"
        print(f"{item.name:22} {item.family:10} {state:8} {check:32} {where}")
    return 0
