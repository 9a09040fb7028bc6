"""3D segmentation of a labelled CT volume from 3D boxes, with and without zoom.

Every labelled structure of TotalSegmentator's example CT series (20 axial slices of 512 x 512,
the project's held-out CT case; its labels are TotalSegmentator's own outputs, pseudo-labels) is
prompted with the exact 3D bounding box of its label and segmented by
:func:`medsam.volume.segment_volume` (propagation from the middle slice, all objects at once, as
``medsam segment`` with several ``--box X0 Y0 Z0 X1 Y1 Z1`` does), once on whole slices and once
with ``zoom`` (:class:`medsam.zoom.ZoomPolicy`). Per object: 3D DSC and NSD (2 mm, the voxel
spacing of the series), printed with the paired differences and a 95 % bootstrap interval.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/volume_zoom.py --json new.json   # default model
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/volume_zoom.py --iou-threshold 0.5 --against new.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/volume_zoom.py --checkpoint lite_medsam.pth

``--against`` prints the paired differences of each run (whole slices, zoom) from the same run
stored in an earlier ``--json`` file (same case and objects).

The series is read from the verified TotalSegmentator 2.18.0 sdist (``medsam.curate.demo_corpus``
fetches it through pip once and checks it; offline afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def load_case():
    """(uint8 volume (Z, Y, X) in the soft-tissue window, label volume, spacing (z, y, x), names)."""
    from medsam.curate.dataset_spec import nifti_label_names
    from medsam.curate.demo_corpus import extract_totalsegmentator
    from medsam.curate.labels import align_label
    from medsam.io import read_image
    from medsam.segment import to_model_input

    root = extract_totalsegmentator()
    image = read_image(root / "example_ct_dicom")
    label = read_image(root / "example_seg_dicom.nii.gz")
    # the NIfTI stores the series with its row axis reversed: put it on the image's voxel grid
    lab, _ = align_label(image, label, mode="reorient")
    lab = np.asarray(lab)
    names = nifti_label_names(root / "example_seg_dicom.nii.gz")  # TotalSegmentator's header table
    pixels = to_model_input(image, "CT", "soft_tissue")
    if lab.shape != pixels.shape:
        raise SystemExit(f"label shape {lab.shape} != image shape {pixels.shape}")
    spacing = tuple(float(s) for s in image.spacing_zyx)
    return pixels, lab, spacing, names


def boxes_of(label: np.ndarray, min_voxels: int) -> tuple[list[int], list[list[int]]]:
    ids, boxes = [], []
    for i in np.unique(label):
        if i == 0:
            continue
        zs, ys, xs = np.nonzero(label == i)
        if zs.size < min_voxels:
            continue
        ids.append(int(i))
        boxes.append([int(xs.min()), int(ys.min()), int(zs.min()), int(xs.max()), int(ys.max()), int(zs.max())])
    return ids, boxes


def score(result_labels: np.ndarray, label: np.ndarray, ids: list[int], spacing) -> list[tuple[float, float]]:
    from medsam.metrics import dice_score, normalized_surface_dice

    out = []
    for n, i in enumerate(ids, start=1):
        pred, gt = result_labels == n, label == i
        out.append((dice_score(pred, gt), normalized_surface_dice(pred, gt, spacing, 2.0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    parser.add_argument("--context", type=float, default=3.0, help="zoom context (default 3)")
    parser.add_argument(
        "--iou-threshold",
        type=float,
        default=None,
        help="stop a walk below this predicted IoU (default: segment_volume's, no IoU stop inside a 3D box)",
    )
    parser.add_argument("--min-voxels", type=int, default=50, help="skip labels smaller than this")
    parser.add_argument("--json", default=None, help="also write per-object results here")
    parser.add_argument("--against", default=None, help="a --json file of an earlier run: print paired differences")
    args = parser.parse_args()

    import torch

    from medsam.predictor import Predictor
    from medsam.scoring import paired_bootstrap
    from medsam.segment import load_reporting
    from medsam.volume import segment_volume
    from medsam.zoom import ZoomPolicy

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pixels, label, spacing, names = load_case()
    ids, boxes = boxes_of(label, args.min_voxels)
    model = load_reporting(args.checkpoint, None, None, lambda m: print(m, flush=True))
    print(
        f"volume {pixels.shape}, spacing {spacing} mm, {len(ids)} objects, model contract {model.contract}", flush=True
    )

    runs = {}
    for name, zoom in (("whole", None), ("zoom", ZoomPolicy(context=args.context))):
        predictor = Predictor(model)
        start = time.perf_counter()
        result = segment_volume(predictor, pixels, boxes, zoom=zoom, iou_threshold=args.iou_threshold)
        seconds = time.perf_counter() - start
        runs[name] = {
            "seconds": seconds,
            "scores": score(result.labels, label, ids, spacing),
            "zoomed": list(result.zoomed),
            "embeddings": result.embeddings_computed,
            "crop_embeddings": result.crop_embeddings_computed,
        }
        print(
            f"{name}: {seconds:.1f} s, {result.embeddings_computed} slice embeddings, "
            f"{result.crop_embeddings_computed} crop embeddings, {sum(runs[name]['zoomed'])} objects zoomed",
            flush=True,
        )

    whole, zoomed = runs["whole"], runs["zoom"]
    print(f"\n{'structure':32s} {'voxels':>7s} zoomed  DSC whole -> zoom   NSD whole -> zoom")
    for k, i in enumerate(ids):
        (dw, nw), (dz, nz) = whole["scores"][k], zoomed["scores"][k]
        name = names.get(i, f"label_{i}")
        print(
            f"{name:32s} {int((label == i).sum()):7d} {'yes' if zoomed['zoomed'][k] else '  -'}   "
            f"{dw:.3f} -> {dz:.3f}    {nw:.3f} -> {nz:.3f}"
        )
    for subset, mask in (
        ("all objects", np.ones(len(ids), bool)),
        ("zoomed objects", np.array(zoomed["zoomed"], bool)),
    ):
        if not mask.any():
            continue
        for m, j in (("DSC", 0), ("NSD", 1)):
            a = np.array([s[j] for s in whole["scores"]])[mask]
            b = np.array([s[j] for s in zoomed["scores"]])[mask]
            _, lo, hi = paired_bootstrap(b - a, resamples=10000)
            print(
                f"{subset} (n={int(mask.sum())}) {m}: whole {a.mean():.3f}, zoom {b.mean():.3f}, "
                f"difference {float((b - a).mean()):+.3f} [{lo:+.3f}, {hi:+.3f}]"
            )
    if args.against:
        with open(args.against) as f:
            other = json.load(f)
        if other["ids"] != ids:
            raise SystemExit(f"{args.against} scored other objects")
        for name in runs:
            for m, j in (("DSC", 0), ("NSD", 1)):
                a = np.array([s[j] for s in other["runs"][name]["scores"]])
                b = np.array([s[j] for s in runs[name]["scores"]])
                _, lo, hi = paired_bootstrap(b - a, resamples=10000)
                print(
                    f"{name}, this run minus {args.against} (n={len(ids)}) {m}: {a.mean():.3f} -> {b.mean():.3f}, "
                    f"difference {float((b - a).mean()):+.3f} [{lo:+.3f}, {hi:+.3f}], "
                    f"better by > 0.01: {int((b - a > 0.01).sum())}, worse by > 0.01: {int((b - a < -0.01).sum())}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "ids": ids,
                    "names": [names.get(i, f"label_{i}") for i in ids],
                    "boxes": boxes,
                    "spacing": spacing,
                    "runs": runs,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
