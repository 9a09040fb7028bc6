"""The ``medsam`` command: a thin layer over the library.

Each subcommand parses its arguments and calls one library function. Expected failures (bad
input, unreadable files, wrong checkpoints) print one line ``medsam: error: ...`` on stderr and
exit with status 2; no traceback. Set ``MEDSAM_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# Modules providing ``add_parser(subparsers)`` and ``run(args) -> int`` for more subcommands.
_COMMAND_MODULES = (
    "medsam.cli_prepare",
    "medsam.cli_train",
    "medsam.cli_export",
    "medsam.cli_serve",
    "medsam.cli_benchmark",
    "medsam.cli_specialist",
)


class CLIError(Exception):
    """An expected failure with a message for the user."""


def _log(message: str) -> None:
    print(message, file=sys.stderr)


# ------------------------------------------------------------------- segment
def _add_segment(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment objects in an image or volume from box prompts",
        description="Segment the objects given by boxes. 2D: --box X0 Y0 X1 Y1 (pixels, x = column, "
        "y = row, inclusive). Volumes: --box X0 Y0 Z0 X1 Y1 Z1 (voxel indices i j k as the file "
        "stores them), or --box X0 Y0 X1 Y1 --slice K. A CVPR 2024 .npz case carries its own boxes.",
    )
    p.add_argument("input", help="PNG/JPEG/TIFF, DICOM file or series folder, NIfTI, NRRD, MHA, or .npz")
    p.add_argument("--box", nargs="+", type=float, action="append", default=[], metavar="COORD",
                   help="a box prompt; repeat for several objects")
    p.add_argument("--slice", type=int, default=None, dest="key_slice", help="key slice for 2D boxes on a volume")
    p.add_argument("-o", "--output", required=True, help="mask file (format from the extension)")
    p.add_argument("--overlay", default=None, help="write an overlay picture (PNG)")
    p.add_argument("--scores", default=None, help="scores JSON (default: OUTPUT stem + .scores.json)")
    p.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    p.add_argument("--contract", choices=("medsam", "sam", "lite"), default=None,
                   help="override the checkpoint's preprocessing contract")
    p.add_argument("--modality", default=None, help="CT, MR, PET, ... (intensity normalisation)")
    p.add_argument("--window", default=None, help="CT window: a name (soft_tissue, lung, brain, bone, liver) or LEVEL,WIDTH")
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument("--iou-threshold", type=float, default=None,
                   help="volumes: stop propagation below this predicted IoU (default: 0.5 for 2D boxes "
                        "with --slice; none inside a 3D box's slice range)")
    p.add_argument("--zoom", type=float, nargs="?", const=3.0, default=None, metavar="CONTEXT",
                   help="segment small boxes on a crop CONTEXT x the box's longest side (default 3): "
                        "in 2D images and on every slice of a volume where the propagated box is small "
                        "(one extra embedding per such box and slice); see medsam.zoom. Without it: "
                        "on (context 3) for 2D inputs with 256 px models such as the embedded one, "
                        "off otherwise")
    p.add_argument("--no-zoom", action="store_true", help="never zoom (not even the 256 px models' 2D default)")
    p.set_defaults(func=_run_segment)


def _parse_window(text: str | None):
    if text is None:
        return None
    if "," in text:
        try:
            level, width = (float(v) for v in text.split(","))
        except ValueError:
            raise CLIError(f"--window must be a name or LEVEL,WIDTH, got {text!r}") from None
        return (level, width)
    return text


def _zoom_policy(context: float | None):
    if context is None:
        return None
    from .zoom import ZoomPolicy

    try:
        return ZoomPolicy(context=context)
    except ValueError as exc:
        raise CLIError(f"--zoom: {exc}") from None


def _zoom_choice(args):
    """The ``zoom`` for segment_file: --no-zoom, --zoom [CONTEXT], or "auto" (neither)."""
    if args.no_zoom and args.zoom is not None:
        raise CLIError("--zoom and --no-zoom exclude each other")
    if args.no_zoom:
        return None
    return "auto" if args.zoom is None else _zoom_policy(args.zoom)


def _run_segment(args) -> int:
    from .segment import segment_file

    for b in args.box:
        if len(b) not in (4, 6):
            raise CLIError(f"--box takes 4 numbers (2D) or 6 (3D), got {len(b)}")
    out = segment_file(
        args.input, args.output, args.box, checkpoint=args.checkpoint, overlay_path=args.overlay,
        scores_path=args.scores, key_slice=args.key_slice, modality=args.modality,
        window=_parse_window(args.window), device=args.device, contract=args.contract,
        series_uid=args.series, volume_options={"iou_threshold": args.iou_threshold},
        zoom=_zoom_choice(args), log=_log,
    )
    print(f"wrote {out.mask_path}")
    if out.scores_path:
        print(f"wrote {out.scores_path}")
    if out.overlay_path:
        print(f"wrote {out.overlay_path}")
    return 0


# ------------------------------------------------------------------ evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score predictions against ground truth (DSC, NSD, HD95)")
    p.add_argument("--pred", required=True, help="prediction file or folder")
    p.add_argument("--gt", required=True, help="ground-truth file or folder (matched by name)")
    p.add_argument("-o", "--output", required=True, help="per-case, per-label CSV")
    p.add_argument("--summary", default=None, help="summary CSV (default: OUTPUT stem + _summary.csv)")
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--modality", default=None)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from pathlib import Path

    from .evaluate import evaluate

    out = Path(args.output)
    summary = args.summary or str(out.with_name(out.stem + "_summary.csv"))
    result = evaluate(args.pred, args.gt, args.output, tolerance_mm=args.tolerance,
                      summary_csv=summary, dataset=args.dataset, modality=args.modality)
    for row in result.summary:
        if row.get("label") == "all" and row.get("dataset") == "all":
            print(f"overall: DSC {row.get('dsc_mean')}, NSD {row.get('nsd_mean')}")
    for row in result.errors:
        _log(f"error in case {row.get('case')}: {row.get('error')}")
    print(f"wrote {args.output} and {summary}")
    return 0


# ---------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: architecture, contract, parameters")
    p.add_argument("checkpoint", nargs="?", default=None)
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import warnings

    from .weights import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.checkpoint, device="cpu")
    n = sum(p.numel() for p in model.parameters())
    print(f"architecture: {model.config.name} ({model.config.encoder}), input {model.input_size} px")
    print(f"contract: {model.contract}")
    print(f"parameters: {n / 1e6:.1f} M")
    if getattr(model, "is_untrained_default", False):
        print("weights: random (no trained default model bundled)")
    return 0


# ---------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="segment the bundled sample images with the embedded default model")
    p.add_argument("-o", "--output", default="demo-output", help="folder for the results")
    p.add_argument("--no-zoom", action="store_true", help="do not segment small 2D boxes on a magnified crop")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.output, log=_log, zoom=not args.no_zoom)
    print(f"wrote {report}")
    return 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="medsam", description="MedSAM: Segment Anything for medical images")
    parser.add_argument("--version", action="version", version=f"medsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_segment(sub)
    _add_evaluate(sub)
    _add_info(sub)
    _add_demo(sub)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
        for extra in ("add_demo_parser",):
            if hasattr(module, extra):
                getattr(module, extra)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _log("medsam: interrupted")
        return 130
    except (CLIError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("MEDSAM_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        _log(f"medsam: error: {message}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
