"""``medsam evaluate``: DSC, NSD and HD95 of predictions against ground truth (:mod:`medsam.evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .options import finite_float
from .runner import CLIError, log

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "label_map", "run"]


def label_map(text: str) -> dict[int, int]:
    """``--label-map PRED=GT[,PRED=GT...]``: prediction label ids -> ground-truth label ids."""
    mapping: dict[int, int] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            src, dst = (int(v) for v in part.split("="))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected PRED=GT pairs such as 1=3,2=5, got {text!r}") from None
        if src < 0 or dst < 0:
            raise argparse.ArgumentTypeError(f"label ids are >= 0, got {part!r}")
        if src in mapping:
            raise argparse.ArgumentTypeError(f"prediction label {src} is mapped twice")
        mapping[src] = dst
    if not mapping:
        raise argparse.ArgumentTypeError("give at least one PRED=GT pair")
    return mapping


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions against ground truth (DSC, NSD, HD95)",
        description="Score a prediction file (or folder) against the ground truth (matched by file "
        "name). A case whose label ids share none with the ground truth is refused (an error row) "
        "unless --label-map says which prediction id is which ground-truth id. Exit status 0: every "
        "case scored; 1: some cases could not be scored (listed); 2: none could.",
    )
    p.add_argument("--pred", required=True, help="prediction file or folder")
    p.add_argument("--gt", required=True, help="ground-truth file or folder (matched by name)")
    p.add_argument("-o", "--output", required=True, help="per-case, per-label CSV")
    p.add_argument("--summary", default=None, help="summary CSV (default: OUTPUT stem + _summary.csv)")
    p.add_argument("--tolerance", type=finite_float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument(
        "--label-map",
        type=label_map,
        default=None,
        metavar="PRED=GT,...",
        help="relabel the prediction before scoring, e.g. 1=3,2=5 (ids not named stay as they are)",
    )
    p.add_argument("--dataset", default=None)
    p.add_argument("--modality", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate

    out = Path(args.output)
    summary = args.summary or str(out.with_name(out.stem + "_summary.csv"))
    if Path(summary).resolve() == out.resolve():
        raise CLIError("--summary and -o must be different files")
    result = evaluate(
        args.pred,
        args.gt,
        args.output,
        tolerance_mm=args.tolerance,
        summary_csv=summary,
        dataset=args.dataset,
        modality=args.modality,
        label_map=args.label_map,
        require_scored=True,
    )
    for row in result.summary:
        if row.get("label") == "all" and row.get("dataset") == "all":
            print(f"overall: DSC {row.get('dsc_mean')}, NSD {row.get('nsd_mean')}")
    for row in result.errors:
        log(f"medsam: case {row.get('case')}: {row.get('error')}")
    print(f"wrote {args.output} and {summary}")
    return 1 if result.errors else 0
