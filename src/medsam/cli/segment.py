"""``medsam segment``: objects in an image or volume from box prompts, or every object with
``--auto`` (:func:`medsam.segment.segment_file`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .options import (
    add_contract_option,
    add_zoom_options,
    ct_window,
    finite_float,
    non_negative_int,
    positive_int,
    zoom_choice,
)
from .runner import CLIError, log

if TYPE_CHECKING:
    from ..automatic import AutoOptions
    from ..segment import SegmentOptions
    from .options import Subparsers


__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "segment",
        help="segment objects in an image or volume from box prompts (or every object: --auto)",
        description="Segment the objects given by boxes. 2D: --box X0 Y0 X1 Y1 (pixels, x = column, "
        "y = row, inclusive). Volumes: --box X0 Y0 Z0 X1 Y1 Z1 (voxel indices i j k as the file "
        "stores them), or --box X0 Y0 X1 Y1 --slice K. A CVPR 2024 .npz case carries its own boxes. "
        "A box that overhangs the image edge is clipped to it (with a warning). With --auto, every "
        "object is found without prompts (SAM's everything mode for SAM models, region proposals "
        "refined by the model for MedSAM models; on a volume, on the --slice K, default the middle "
        "one, then propagated) and written as an instance label map with per-object scores. Videos "
        "(a folder of frames, a multi-page colour TIFF, .mp4/.avi/.mov/.mkv/.webm): --box X0 Y0 X1 Y1 "
        "--slice K on frame K, masks out as a folder of PNGs or a .tif.",
    )
    p.add_argument(
        "input",
        help="PNG/JPEG/TIFF, DICOM file or series folder, NIfTI, NRRD, MHA, or .npz; a video (a "
        "folder of frames, a video file); or a folder of images with --prompts (or --auto and an "
        "output folder)",
    )
    p.add_argument(
        "--box",
        nargs="+",
        type=finite_float,
        action="append",
        default=[],
        metavar="COORD",
        help="a box prompt; repeat for several objects",
    )
    p.add_argument(
        "--point",
        nargs="+",
        type=finite_float,
        action="append",
        default=[],
        metavar="COORD",
        help="a foreground click: X Y (pixels; on --slice K of a volume or video; with at most one "
        "box, for one object) or I J K (voxel indices of a volume, with a SAM-Med3D checkpoint: "
        "segmented natively in 3D, every --point then every --negative-point decoded in turn); "
        "repeat for several clicks",
    )
    p.add_argument(
        "--negative-point",
        nargs="+",
        type=finite_float,
        action="append",
        default=[],
        metavar="COORD",
        help="a background click, as --point",
    )
    p.add_argument(
        "--sliding-window",
        action="store_true",
        help="with voxel clicks (SAM-Med3D): follow an object past the 128^3 crop with crops shifted "
        "by half their side (at most 8), overlaps averaged",
    )
    p.add_argument(
        "--slice",
        type=int,
        default=None,
        dest="key_slice",
        help="key slice for 2D boxes on a volume (the frame, for a video)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="mask file (format from the extension), or a folder for folder runs"
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="folder runs: a JSON or CSV file naming each image's boxes (and key slice) or 'auto' "
        "(see medsam.batch); one model load, a summary.csv, finished cases skipped on a re-run",
    )
    p.add_argument("--no-progress", action="store_true", help="folder runs: no progress bar")
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="keep slice embeddings in DIR: a rerun on the same images and model (other boxes, a "
        "folder run resumed) reads them instead of computing them",
    )
    p.add_argument("--overlay", default=None, help="write an overlay picture (PNG)")
    p.add_argument(
        "--rtstruct",
        default=None,
        metavar="FILE",
        help="DICOM inputs: also write the objects as an RTSTRUCT referencing the series "
        "(-o seg.dcm writes the mask itself as DICOM-SEG)",
    )
    p.add_argument("--scores", default=None, help="scores JSON (default: OUTPUT stem + .scores.json)")
    p.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    p.add_argument(
        "--arch",
        default=None,
        help="the checkpoint's architecture when its tensors do not tell (e.g. medsam2, sam2.1_hiera_tiny)",
    )
    add_contract_option(p)
    p.add_argument("--modality", default=None, help="CT, MR, PET, ... (intensity normalisation)")
    p.add_argument(
        "--window",
        type=ct_window,
        default=None,
        help="CT window: a name (soft_tissue, lung, brain, bone, liver) or LEVEL,WIDTH",
    )
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument(
        "--iou-threshold",
        type=finite_float,
        default=None,
        help="volumes: stop propagation below this predicted IoU (default: 0.5 for 2D boxes "
        "with --slice; none inside a 3D box's slice range)",
    )
    add_zoom_options(
        p,
        ": in 2D images and on every slice of a volume where the propagated box is small (one extra "
        "embedding per such box and slice)",
        recipe="on for 2D inputs with 256 px models such as the embedded one",
    )
    auto = p.add_argument_group("automatic mode (medsam.automatic)")
    auto.add_argument("--auto", action="store_true", help="find every object without prompts")
    auto.add_argument(
        "--auto-prompt",
        choices=("points", "boxes"),
        default=None,
        help="how the model is asked: a grid of clicks (SAM) or region boxes (MedSAM); default: by the model",
    )
    auto.add_argument("--points-per-side", type=positive_int, default=32, help="click grid side (default 32)")
    auto.add_argument("--pred-iou-thresh", type=finite_float, default=None, help="keep masks above this predicted IoU")
    auto.add_argument(
        "--stability-thresh", type=finite_float, default=None, help="keep masks with this stability score or more"
    )
    auto.add_argument(
        "--min-region-area", type=non_negative_int, default=0, help="fill holes and drop islands below this area"
    )
    auto.add_argument("--crop-layers", type=non_negative_int, default=0, help="also search 2^i x 2^i crops, i = 1..N")
    auto.add_argument(
        "--proposals",
        default=None,
        metavar="LABELS",
        help="a label map on the input's grid whose connected pieces say where objects are; the model "
        "outlines each piece from its box (2D) or 3D box (volumes)",
    )
    auto.add_argument(
        "--specialist",
        default=None,
        metavar="CKPT",
        help="2D: a specialist U-Net (medsam specialist-train) whose prediction gives the proposals",
    )
    p.set_defaults(func=run)


def _auto_options(args: argparse.Namespace) -> AutoOptions | None:
    if not args.auto:
        if args.proposals or args.specialist:
            raise CLIError("--proposals and --specialist go with --auto")
        return None
    if args.proposals and args.specialist:
        raise CLIError("give --proposals or --specialist, not both")
    if args.box:
        raise CLIError("--auto finds its own objects: give either --box or --auto")
    from ..automatic import AutoOptions

    try:
        return AutoOptions(
            prompt=args.auto_prompt,
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_thresh,
            min_mask_region_area=args.min_region_area,
            crop_n_layers=args.crop_layers,
        )
    except ValueError as exc:
        raise CLIError(f"--auto: {exc}") from None


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be judged without reading the input or loading a model."""
    for b in args.box:
        if len(b) not in (4, 6):
            raise CLIError(f"--box takes 4 numbers (2D) or 6 (3D), got {len(b)}")
    from ..io.formats import check_segment_paths, is_dicom_source

    check_segment_paths(args.input, args.output, args.overlay)
    if args.rtstruct is not None:
        if not is_dicom_source(args.input):
            raise CLIError("--rtstruct references a DICOM series: the input must be DICOM")
        if not str(args.rtstruct).lower().endswith(".dcm"):
            raise CLIError(f"--rtstruct writes a DICOM file: give a .dcm name, got {args.rtstruct}")


def _folder_run(args: argparse.Namespace) -> bool:
    """Whether this is a folder run: --prompts, or --auto on a folder with an output folder."""
    from pathlib import Path

    from ..io.formats import format_of

    if args.prompts is not None:
        return True
    if not (args.auto and Path(args.input).is_dir() and format_of(args.output) is None):
        return False
    # a folder of images, not one DICOM series (whose files are one input)
    return any(format_of(p) not in (None, "dicom") for p in Path(args.input).iterdir() if p.is_file())


def check_folder_arguments(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..io.formats import format_of

    for flag, value in (
        ("--box", args.box),
        ("--point", args.point),
        ("--negative-point", args.negative_point),
        ("--overlay", args.overlay),
        ("--scores", args.scores),
        ("--rtstruct", args.rtstruct),
        ("--proposals", args.proposals),
    ):
        if value:
            raise CLIError(f"{flag} applies to one file; a folder run takes its prompts from --prompts")
    if args.key_slice is not None:
        raise CLIError("--slice applies to one file; give each volume's slice in the prompts file")
    if not Path(args.input).is_dir():
        raise CLIError(f"a folder run needs a folder as input, got {args.input}")
    if format_of(args.output) is not None or Path(args.output).is_file():
        raise CLIError(f"a folder run writes into a folder: -o {args.output} names a file")


def _clicks(
    positive: list[list[float]], negative: list[list[float]]
) -> tuple[list[list[float]], list[list[float]], tuple[tuple[int, int, int, bool], ...]]:
    """2D clicks (X Y) and voxel clicks (I J K, integers) from --point / --negative-point, in
    the order given (positive ones first); one kind only."""
    sizes = {len(c) for c in (*positive, *negative)}
    if not sizes <= {2, 3}:
        raise CLIError("a click is X Y (2D) or I J K (voxel indices of a volume)")
    if sizes == {2, 3}:
        raise CLIError("give all clicks as X Y or all as I J K, not both")
    if sizes != {3}:
        return positive, negative, ()
    for c in (*positive, *negative):
        if any(v != int(v) for v in c):
            raise CLIError(f"voxel clicks are integer indices, got {' '.join(f'{v:g}' for v in c)}")
    voxel = tuple((int(i), int(j), int(k), True) for i, j, k in positive)
    return [], [], voxel + tuple((int(i), int(j), int(k), False) for i, j, k in negative)


def run(args: argparse.Namespace) -> int:
    zoom = zoom_choice(args)
    if _folder_run(args):
        check_folder_arguments(args)
    else:
        check_arguments(args)
    auto = _auto_options(args)
    flat, flat_negative, voxel_points = _clicks(args.point, args.negative_point)
    from ..segment import SegmentOptions, segment_file

    options = SegmentOptions(
        checkpoint=args.checkpoint,
        arch=args.arch,
        overlay_path=args.overlay,
        rtstruct_path=args.rtstruct,
        cache_dir=args.cache,
        scores_path=args.scores,
        key_slice=args.key_slice,
        points=tuple((c[0], c[1], True) for c in flat) + tuple((c[0], c[1], False) for c in flat_negative),
        voxel_points=voxel_points,
        sliding_window=args.sliding_window,
        modality=args.modality,
        window=args.window,
        device=args.device,
        contract=args.contract,
        series_uid=args.series,
        iou_threshold=args.iou_threshold,
        zoom=zoom,
        auto=auto,
        proposals=args.proposals,
        specialist=args.specialist,
    )
    if _folder_run(args):
        return _run_folder(args, options)
    out = segment_file(args.input, args.output, args.box, options, log=log)
    print(f"wrote {out.mask_path}")
    if out.scores_path:
        print(f"wrote {out.scores_path}")
    if out.overlay_path:
        print(f"wrote {out.overlay_path}")
    return 0


def _run_folder(args: argparse.Namespace, options: SegmentOptions) -> int:
    from pathlib import Path

    from ..batch import PromptsError, every_file, read_prompts, segment_folder

    folder = Path(args.input)
    try:
        cases = read_prompts(args.prompts, folder) if args.prompts else every_file(folder)
    except PromptsError as exc:
        raise CLIError(str(exc)) from None
    if not cases:
        raise CLIError(f"no case to segment in {folder}")
    try:
        rows = segment_folder(folder, cases, args.output, options, log=log, progress=not args.no_progress)
    except PromptsError as exc:
        raise CLIError(str(exc)) from None
    counts = {status: sum(r.status == status for r in rows) for status in ("done", "skipped", "failed")}
    for r in rows:
        if r.status == "failed":
            log(f"failed: {r.image}: {r.error}")
    print(
        f"{counts['done']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed; "
        f"wrote {Path(args.output) / 'summary.csv'}"
    )
    return 1 if counts["failed"] else 0
