"""A simulated annotator: how many prompts does the model need to reach DSC 0.9 per object?

For every labelled structure of the bundled 2D samples (a real CT and a real MR slice; labels are
TotalSegmentator pseudo-labels), the annotator first draws the object's bounding box, then keeps
clicking where the mask is most wrong: at the pixel deepest inside the largest error region
(Euclidean distance transform), a positive click in a missed region, a negative click in a false
one, each call with the box and all clicks so far (``--mask-prompt`` also passes the previous
low-resolution logits). It stops at
DSC >= 0.9 or after 10 clicks. Manual outlining is represented by the object's boundary length in
pixels (a proxy for the number of polygon vertices / mouse travel of a hand-drawn outline).

    .venv/bin/python benchmarks/simulated_annotator.py [--checkpoint CKPT] [--target 0.9]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int] | None:
    """(x, y, label) of the next corrective click, or None when the mask is perfect."""
    fn = gt & ~pred
    fp = pred & ~gt
    best = None
    for region, label in ((fn, 1), (fp, 0)):
        if not region.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        if best is None or depth[y, x] > best[0]:
            best = (depth[y, x], int(x), int(y), label)
    return None if best is None else best[1:]


def boundary_length(mask: np.ndarray) -> int:
    """Pixels on the object's 4-connected inner boundary."""
    return int((mask & ~ndimage.binary_erosion(mask)).sum())


def main() -> int:
    import medsam
    from medsam.demo import bundled_samples
    from medsam.io import read_image
    from medsam.metrics import dice_score

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument("--mask-prompt", action="store_true",
                        help="also pass the previous low-res logits (MedSAM/LiteMedSAM never saw mask prompts)")
    args = parser.parse_args()
    predictor = medsam.Predictor(medsam.load_model(args.checkpoint, device="cpu"))
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
            result = predictor.predict(boxes=[box])
            pred, dsc, points, labels, prompts = result.masks[0], dice_score(result.masks[0], gt), [], [], 1
            first = dsc
            while dsc < args.target and len(points) < args.max_clicks:
                click = next_click(pred, gt)
                if click is None:
                    break
                points.append(click[:2])
                labels.append(click[2])
                result = predictor.predict(
                    boxes=[box], points=[points], point_labels=[labels],
                    mask_input=result.low_res_logits[:, :1] if args.mask_prompt else None,
                )
                pred, dsc, prompts = result.masks[0], dice_score(result.masks[0], gt), prompts + 1
            rows.append((sample.name, sample.label_names.get(lab, str(lab)), int(gt.sum()), first, dsc,
                         prompts if dsc >= args.target else None, boundary_length(gt)))
    print(f"{'sample':10s} {'structure':28s} {'px':>6s} {'DSC box':>8s} {'DSC end':>8s} {'prompts to target':>17s} {'outline px':>10s}")
    for name, struct, px, first, last, prompts, outline in rows:
        shown = str(prompts) if prompts is not None else f">{args.max_clicks + 1}"
        print(f"{name:10s} {struct:28s} {px:6d} {first:8.3f} {last:8.3f} {shown:>17s} {outline:10d}")
    reached = [r[5] for r in rows if r[5] is not None]
    print(f"\n{len(reached)}/{len(rows)} objects reached DSC {args.target}; "
          f"median prompts {np.median(reached) if reached else float('nan'):.1f} (box = 1); "
          f"median outline length {np.median([r[6] for r in rows]):.0f} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
