"""``medsam specialist-train`` and ``medsam specialist-eval``: the specialist U-Net baseline.

    medsam specialist-train --corpus C --datasets totalseg_ct [--epochs N] [--size 256] -o RUN_DIR
    medsam specialist-eval --corpus C --checkpoint RUN_DIR/unet.safetensors --split test -o OUT_DIR

Needs MONAI (``pip install 'medsam[specialist]'``). See :mod:`medsam.specialist`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .runner import log

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "run_eval", "run_train"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def add_parser(subparsers: Subparsers) -> None:
    """Register ``specialist-train`` and ``specialist-eval`` on an argparse ``subparsers`` object."""
    t = subparsers.add_parser(
        "specialist-train",
        help="train a fully automatic multi-class 2D U-Net (MONAI) on a corpus: the specialist baseline",
        description=(
            "Train one 2D U-Net with a channel per structure (the union of the labels of the chosen "
            "datasets' training rows, or --labels) on the corpus's train split; the val split selects "
            "the epoch. Writes RUN_DIR/unet.safetensors (+ .json), last.safetensors, config.json and "
            "train_log.csv."
        ),
    )
    t.add_argument("--corpus", required=True, help="corpus folder (with manifest.csv)")
    t.add_argument("--datasets", nargs="+", required=True, metavar="NAME", help="the dataset group to learn")
    t.add_argument(
        "--labels",
        type=_ints,
        default=None,
        metavar="ID,ID,...",
        help="only these label ids (default: every id in the training rows)",
    )
    t.add_argument("--epochs", type=int, default=40, help="passes over the training slices (default 40)")
    t.add_argument("--size", type=int, default=256, help="network input size in pixels (default 256)")
    t.add_argument(
        "--pixel-mm",
        type=float,
        default=None,
        metavar="MM",
        help="resample slices to MM mm per pixel and pad/crop them to --size (default: resize "
        "every slice to --size x --size whatever its spacing)",
    )
    t.add_argument(
        "--no-reorient",
        action="store_true",
        help="keep each case's stored voxel order (default: one canonical in-plane orientation "
        "from case.json, as cases from NIfTI and DICOM can be mirrored)",
    )
    t.add_argument("--batch-size", type=int, default=8, help="slices per step (default 8)")
    t.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, cosine decay (default 2e-3)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    t.add_argument(
        "--channels",
        type=_ints,
        default=(16, 32, 64, 128, 256),
        metavar="C1,C2,...",
        help="U-Net channels per level, stride 2 between levels (default 16,32,64,128,256)",
    )
    t.add_argument("--res-units", type=int, default=2, help="residual units per block (default 2)")
    t.add_argument("--no-augment", action="store_true", help="no random affine / gamma augmentation")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop training after this many minutes (the epoch is finished and validated)",
    )
    t.add_argument(
        "--select",
        choices=("best", "last"),
        default="best",
        help="unet.safetensors = best validation DSC epoch (default) or the last one",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    t.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder")
    t.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "specialist-eval",
        help="score a specialist U-Net on a corpus split per object (DSC, NSD), as `medsam benchmark`",
        description=(
            "Predict each slice of the split with the specialist (no prompts) and score every manifest "
            "row (object): DSC and NSD against label == row.label. Writes the files of `medsam "
            "benchmark` (objects.csv, summary.csv, summary.md, ...) into OUT_DIR, so `medsam benchmark "
            "--compare` can put the specialist beside MedSAM."
        ),
    )
    e.add_argument("--corpus", required=True, help="corpus folder (with manifest.csv)")
    e.add_argument("--checkpoint", required=True, help="RUN_DIR/unet.safetensors (or RUN_DIR)")
    e.add_argument("--split", default="test", help="train, val or test (default test)")
    e.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="datasets to score (default: those the specialist was trained on)",
    )
    e.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    e.add_argument("--name", default=None, help="method name in the outputs (default specialist-unet)")
    e.add_argument("--no-plot", action="store_true", help="do not draw dsc_by_structure.png")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    e.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    e.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from ..specialist import SpecialistConfig, train_specialist

    if not Path(args.corpus).is_dir():
        raise FileNotFoundError(f"corpus folder not found: {args.corpus}")
    cfg = SpecialistConfig(
        corpus=args.corpus,
        datasets=tuple(args.datasets),
        output=args.output,
        labels=args.labels,
        epochs=args.epochs,
        size=args.size,
        pixel_mm=args.pixel_mm,
        reorient=not args.no_reorient,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        channels=tuple(args.channels),
        num_res_units=args.res_units,
        augment=not args.no_augment,
        seed=args.seed,
        time_limit=None if args.time_limit is None else 60.0 * args.time_limit,
        select=args.select,
        device=args.device,
    )
    result = train_specialist(cfg, progress=log)
    best = f", best validation DSC {result.best_val_dsc:.4f}" if result.best_val_dsc is not None else ""
    print(
        f"trained {result.classes.num_classes - 1} structures, {result.epochs} epochs / {result.steps} steps "
        f"in {result.seconds:.0f} s (stopped by {result.stopped_by}){best}; "
        f"selected epoch {result.selected_epoch}"
    )
    print(f"wrote {result.checkpoint}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..specialist import evaluate_specialist

    if not Path(args.corpus).is_dir():
        raise FileNotFoundError(f"corpus folder not found: {args.corpus}")
    result = evaluate_specialist(
        args.corpus,
        args.checkpoint,
        args.output,
        split=args.split,
        datasets=args.datasets,
        tolerance_mm=args.tolerance,
        device=args.device,
        name=args.name,
        plot=not args.no_plot,
        log=log,
    )
    overall = result.overall()
    print(
        f"{result.method}: {overall['objects']} objects, DSC {overall['dsc_mean']:.4f}, "
        f"NSD {overall['nsd_mean']:.4f} ({result.info['objects_not_in_classes']} objects of labels "
        f"the network does not have)"
    )
    if result.errors:
        print(f"{len(result.errors)} rows skipped (see {Path(args.output) / 'errors.csv'})")
    print(
        f"wrote {Path(args.output) / 'objects.csv'}, {Path(args.output) / 'summary.csv'}, "
        f"{Path(args.output) / 'summary.md'}"
    )
    return 0
