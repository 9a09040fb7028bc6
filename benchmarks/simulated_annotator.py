"""A simulated annotator: how many prompts does the model need to reach DSC 0.9 per object?

For every labelled structure of the bundled 2D samples (a real CT and a real MR slice; labels are
TotalSegmentator pseudo-labels), the annotator first draws the object's bounding box, then keeps
clicking where the mask is most wrong: at the pixel deepest inside the largest error region
(Euclidean distance transform), a positive click in a missed region, a negative click in a false
one, each call with the box and all clicks so far (``--mask-prompt`` also passes the previous
low-resolution logits). It stops at
DSC >= 0.9 or after 10 clicks. Manual outlining is represented by the object's boundary length in
pixels (a proxy for the number of polygon vertices / mouse travel of a hand-drawn outline).
With ``--scribbles`` each correction is a stroke instead of a click: along the medial axis of the
same error region (``medsam.scribbles.next_scribble``), given as the points sampled along it.
With ``--candidates`` every call also returns the decoder's three multimask masks and the
annotator keeps the best of the four (a person cycling through the workbench's proposals).

    .venv/bin/python benchmarks/simulated_annotator.py [--checkpoint CKPT] [--target 0.9] [--scribbles]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from medsam.clicks import next_click
from medsam.scribbles import next_scribble, sample_stroke


def boundary_length(mask: np.ndarray) -> int:
    """Pixels on the object's 4-connected inner boundary."""
    return int((mask & ~ndimage.binary_erosion(mask)).sum())


def main() -> int:
    import medsam
    from medsam.demo import bundled_samples
    from medsam.io import read_image
    from medsam.metrics import dice_score
    from medsam.zoom import should_zoom, zoom_window

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument(
        "--mask-prompt",
        action="store_true",
        help="also pass the previous low-res logits (MedSAM/LiteMedSAM never saw mask prompts)",
    )
    parser.add_argument(
        "--zoom",
        type=float,
        default=None,
        metavar="CONTEXT",
        help="small objects: box and clicks on a crop CONTEXT x the box side (medsam.zoom)",
    )
    parser.add_argument(
        "--scribbles",
        action="store_true",
        help="each correction is a stroke along the error region's medial axis (medsam.scribbles), not a click",
    )
    parser.add_argument("--spacing", type=float, default=None, help="--scribbles: pixels between sampled points")
    parser.add_argument("--max-points", type=int, default=None, help="--scribbles: most points per stroke")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="each call also returns the decoder's three multimask candidates and the annotator keeps "
        "the best of the four (a person picking the best-looking proposal on the page)",
    )
    args = parser.parse_args()
    stroke_options = {k: v for k, v in (("spacing", args.spacing), ("max_points", args.max_points)) if v is not None}
    model = medsam.load_model(args.checkpoint, device="cpu")
    predictor = medsam.Predictor(model, zoom=False)  # --zoom below, by hand
    crop_predictor = medsam.Predictor(model, zoom=False)
    policy = None
    if args.zoom is not None:
        from medsam.zoom import ZoomPolicy

        policy = ZoomPolicy(context=args.zoom)
    rows = []
    for sample in bundled_samples():
        if sample.kind != "2d":
            continue
        image = read_image(sample.image).array
        label = read_image(sample.label).array
        predictor.set_image(image)
        for lab in sorted(int(v) for v in np.unique(label) if v):
            gt = label == lab
            if gt.sum() < 20:
                continue
            ys, xs = np.nonzero(gt)
            box = [xs.min(), ys.min(), xs.max(), ys.max()]
            # With --zoom, a small object is annotated on its magnified crop: the model sees the
            # crop, the annotator's box and clicks are shifted into it, the mask pasted back.
            oy, ox, active = 0, 0, predictor
            if policy is not None and should_zoom(box, gt.shape, policy):
                y0, y1, x0, x1 = zoom_window(box, gt.shape, policy.context, policy.min_side)
                crop_predictor.set_image(np.ascontiguousarray(image[y0:y1, x0:x1]))
                oy, ox, active = y0, x0, crop_predictor

            def ask(points, labels, previous):
                shifted_box = [box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy]
                kwargs = {}
                if points:
                    kwargs = {"points": [[(x - ox, y - oy) for x, y in points]], "point_labels": [labels]}
                result = active.predict(
                    boxes=[shifted_box], mask_input=previous if args.mask_prompt else None, **kwargs
                )
                h, w = result.masks[0].shape
                masks = [result.masks[0]]
                if args.candidates:
                    multi = active.predict(
                        boxes=[shifted_box], mask_input=previous if args.mask_prompt else None, multimask=True, **kwargs
                    )
                    masks += list(multi.masks[0])
                best = None
                for m in masks:
                    full = np.zeros_like(gt)
                    full[oy : oy + h, ox : ox + w] = m
                    if best is None or dice_score(full, gt) > best[0]:
                        best = (dice_score(full, gt), full)
                return result, best[1]

            result, pred = ask([], [], None)
            dsc, points, labels, prompts = dice_score(pred, gt), [], [], 1
            first = dsc
            while dsc < args.target and prompts - 1 < args.max_clicks:
                if args.scribbles:
                    stroke = next_scribble(pred, gt)
                    if stroke is None:
                        break
                    new = sample_stroke(stroke.vertices, **stroke_options)
                    points.extend((float(x), float(y)) for x, y in new)
                    labels.extend([1 if stroke.positive else 0] * len(new))
                else:
                    click = next_click(pred, gt)
                    if click is None:
                        break
                    points.append(click[:2])
                    labels.append(click[2])
                result, pred = ask(points, labels, result.low_res_logits[:, :1])
                dsc, prompts = dice_score(pred, gt), prompts + 1
            rows.append(
                (
                    sample.name,
                    sample.label_names.get(lab, str(lab)),
                    int(gt.sum()),
                    first,
                    dsc,
                    prompts if dsc >= args.target else None,
                    boundary_length(gt),
                )
            )
    print(
        f"{'sample':10s} {'structure':28s} {'px':>6s} {'DSC box':>8s} {'DSC end':>8s} {'prompts to target':>17s} {'outline px':>10s}"
    )
    for name, struct, px, first, last, prompts, outline in rows:
        shown = str(prompts) if prompts is not None else f">{args.max_clicks + 1}"
        print(f"{name:10s} {struct:28s} {px:6d} {first:8.3f} {last:8.3f} {shown:>17s} {outline:10d}")
    reached = [r[5] for r in rows if r[5] is not None]
    print(
        f"\n{len(reached)}/{len(rows)} objects reached DSC {args.target}; "
        f"median prompts {np.median(reached) if reached else float('nan'):.1f} (box = 1); "
        f"median outline length {np.median([r[6] for r in rows]):.0f} px"
    )
    first, last = np.array([r[3] for r in rows]), np.array([r[4] for r in rows])
    print(
        f"mean DSC box {first.mean():.3f} -> end {last.mean():.3f}; box >= {args.target}: {(first >= args.target).sum()}; "
        f"improved {(last > first + 1e-9).sum()}, worse {(last < first - 1e-9).sum()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
