"""Calibrate a model's mask threshold on validation corpora, and write the calibrated model.

A model whose masks are systematically smaller (or larger) than the objects it is asked for
gains from another threshold on its per-pixel scores than the contract's standard (0.5 on
probabilities). For each corpus: every object of ``--split`` (at most ``--max-objects``, in
manifest order) is prompted with its exact box, through ``medsam.Predictor`` with the model's
own recipe (zoom included) and the contract's standard threshold; its score map is thresholded
at each value of ``--grid``. The chosen threshold maximises the mean DSC over the corpora (each
corpus weighs the same); ``-o`` writes the model with it as ``mask_threshold`` in the metadata
(fp16 with ``--half``), which ``medsam.Predictor``, the CLI, the workbench and the ONNX export
apply (``docs/model-card.md``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibrate_threshold.py --checkpoint CKPT \\
        --corpus CORPUS:val:300 --corpus LESIONS_VAL:val --corpus MASSES_VAL:val \\
        [-o calibrated.safetensors --half] [--json sweep.json]

``CORPUS[:SPLIT[:MAX]]``: a corpus folder, its split (default ``val``) and at most MAX objects.
Corpora used to choose a threshold must be held out from the test sets it is reported on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

GRID = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04)


def sweep(model, corpus: Path, split: str, max_objects: int | None, grid) -> np.ndarray:
    """(objects, len(grid)) DSC of each object's mask at each threshold."""
    import medsam
    from medsam.corpus import read_manifest
    from medsam.corpus.read import group_by_slice, load_slice
    from medsam.metrics import dice_score
    from medsam.scoring import object_box

    rows = read_manifest(corpus, split)[:max_objects]
    if not rows:
        raise SystemExit(f"error: {corpus} has no objects in split {split!r}")
    from medsam.preprocess import model_contract

    predictor = medsam.Predictor(model, mask_threshold=model_contract(model).standard_threshold)
    scores = []
    for objects in group_by_slice(rows).values():
        image, labels, _ = load_slice(corpus, objects[0])
        predictor.set_image(image, defer=True)
        boxes = [object_box(r, labels.shape) for r in objects]
        bad = [b for b in boxes if isinstance(b, str)]
        if bad:
            raise SystemExit(f"error: {corpus}: {bad[0]}")
        prediction = predictor.predict(boxes=np.asarray(boxes, dtype=np.float64))
        for i, row in enumerate(objects):
            score_map, truth = prediction.score_maps(i)[0], labels == row.label
            scores.append([dice_score(score_map > t, truth) for t in grid])
    return np.asarray(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="weights (default: the embedded model)")
    parser.add_argument("--corpus", action="append", required=True, metavar="CORPUS[:SPLIT[:MAX]]")
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="thresholds tried")
    parser.add_argument("-o", "--out", type=Path, help="write the model with the chosen threshold")
    parser.add_argument("--half", action="store_true", help="write fp16 weights (as the embedded default)")
    parser.add_argument("--label", default=None, help="source_checkpoint recorded in the written file")
    parser.add_argument("--json", type=Path, help="write every corpus's mean DSC per threshold")
    args = parser.parse_args(argv)
    from medsam.weights import load_model, read_state_dict, save_model

    model = load_model(args.checkpoint, device="cpu")
    grid = [float(t) for t in args.grid]
    means: dict[str, list[float]] = {}
    for spec in args.corpus:
        folder, _, rest = spec.partition(":")
        split, _, cap = rest.partition(":")
        key = f"{Path(folder).name}:{split or 'val'}" + (f":{cap}" if cap else "")
        dsc = sweep(model, Path(folder), split or "val", int(cap) if cap else None, grid)
        means[key] = dsc.mean(axis=0).tolist()
        print(f"{key} ({len(dsc)} objects): " + " ".join(f"{t:g}:{m:.4f}" for t, m in zip(grid, means[key])))
    overall = np.mean(list(means.values()), axis=0)
    best = int(np.argmax(overall))
    print("mean over corpora: " + " ".join(f"{t:g}:{m:.4f}" for t, m in zip(grid, overall)))
    print(f"chosen threshold {grid[best]:g} (mean DSC {overall[best]:.4f}; standard {grid[0]:g}: {overall[0]:.4f})")
    if args.json:
        args.json.write_text(json.dumps({"grid": grid, "corpora": means, "chosen": grid[best]}, indent=1))
    if args.out:
        from medsam.default_model import bundled_checkpoint

        source = args.checkpoint or bundled_checkpoint()
        extra = {}
        if source:
            _, metadata = read_state_dict(source)
            extra = {k: v for k, v in metadata.items() if k == "source_checkpoint"}
        if args.label:
            extra["source_checkpoint"] = args.label
        extra["mask_threshold_calibration"] = {"corpora": list(means), "grid": grid, "mean_dsc": float(overall[best])}
        model.mask_threshold = grid[best]
        if args.half:
            model = model.half()
        print(save_model(model, args.out, extra=extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
