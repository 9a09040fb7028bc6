"""``medsam benchmark``: score a model or a baseline on a split of a prepared corpus.

    medsam benchmark --corpus CORPUS [--split test] [--checkpoint CKPT | --baseline box|otsu]
                     [--jitter PX] [--seed S] [--max-objects N] [--datasets NAME ...] -o OUT_DIR
    medsam benchmark --compare OUT_DIR [OUT_DIR ...] -o DIR      # side-by-side table of runs

See :mod:`medsam.benchmark` for the protocol.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .options import add_contract_option, add_zoom_options, zoom_choice
from .runner import log

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark",
        help="score a model (or the box/otsu baseline) on a prepared corpus split: DSC, NSD, latency",
        description=(
            "Run a model over a split of a corpus made by `medsam prepare`, prompting each object "
            "with its ground-truth box (optionally jittered), one embedding per slice and all its "
            "objects in one batched call. Writes objects.csv, slices.csv, errors.csv, summary.csv, "
            "summary.md, run.json and dsc_by_structure.png into OUT_DIR. With --compare, writes a "
            "side-by-side table (compare.md, compare.csv) of earlier outputs instead."
        ),
    )
    p.add_argument("--corpus", default=None, help="corpus folder (with manifest.csv)")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    what.add_argument(
        "--baseline",
        choices=("box", "otsu"),
        default=None,
        help="score a baseline instead of a model: fill the box, or Otsu inside it",
    )
    add_contract_option(p)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="image encoder precision")
    p.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="PX",
        help="move each box side outwards by up to PX pixels at the 1024 scale (default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the jitter and of --max-objects (default 0)")
    p.add_argument(
        "--max-objects",
        type=int,
        default=None,
        metavar="N",
        help="at most N objects per dataset (a seeded random subset)",
    )
    p.add_argument("--datasets", nargs="+", default=[], metavar="NAME", help="only these datasets")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    add_zoom_options(p, ", one extra embedding each (in the decode time)")
    p.add_argument("--name", default=None, help="method name in the outputs")
    p.add_argument("--no-plot", action="store_true", help="do not draw dsc_by_structure.png")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="OUT_DIR",
        help="compare earlier benchmark outputs instead of running one",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import compare_runs, run_benchmark

    out = Path(args.output)
    if args.compare:
        table, markdown = compare_runs(args.compare)
        from ..benchmark import write_table
        from ..io.atomic import write_text

        columns = list(table[0].keys()) if table else ["level"]
        write_table(out / "compare.csv", columns, table)
        write_text(out / "compare.md", markdown)
        print(markdown, end="")
        print(f"wrote {out / 'compare.md'} and {out / 'compare.csv'}")
        return 0
    if not args.corpus:
        raise ValueError("--corpus is required (or --compare OUT_DIR ...)")
    if not Path(args.corpus).is_dir():
        raise FileNotFoundError(f"corpus folder not found: {args.corpus}")
    if args.baseline and (args.zoom is not None or args.no_zoom):
        raise ValueError("--zoom and --no-zoom apply to models, not to baselines")
    zoom = zoom_choice(args)
    result = run_benchmark(
        args.corpus,
        out,
        split=args.split,
        checkpoint=args.checkpoint,
        baseline=args.baseline,
        contract=args.contract,
        device=args.device,
        precision=args.precision,
        jitter=args.jitter,
        seed=args.seed,
        max_objects=args.max_objects,
        datasets=args.datasets,
        tolerance_mm=args.tolerance,
        name=args.name,
        plot=not args.no_plot,
        zoom=zoom,
        log=log,
    )
    overall = result.overall()
    print(
        f"{result.method}: {overall['objects']} objects, DSC {overall['dsc_mean']:.4f}, NSD {overall['nsd_mean']:.4f}"
    )
    if result.errors:
        print(f"{len(result.errors)} rows skipped (see {out / 'errors.csv'})")
    print(f"wrote {out / 'objects.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}")
    if result.plot_path:
        print(f"wrote {result.plot_path}")
    else:
        print(f"no plot: {result.info.get('plot')}")
    return 0
