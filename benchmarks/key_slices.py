"""Corrections that re-propagate: what a second (third, ...) key slice buys over fixing one slice.

For every structure of the bundled CT volume (``medsam/data/samples/ct_volume.nii.gz``, 12 slices
of a test-split case; labels are TotalSegmentator pseudo-labels) spanning at least 4 slices, a
simulated annotator draws the structure's tight 2D box on its middle slice and propagates it
(:func:`medsam.volume.segment_volume`, a :class:`Box2D`). Then, up to ``--corrections`` times, it
finds the slice where the result is worst (lowest slice DSC among slices where the label or the
result is present) and corrects it by hand (the slice becomes the label's mask, as brushing it
in the workbench does). Then:

* ``fix slice``: nothing else changes (a correction without re-propagation);
* ``re-propagate``: the corrected slice becomes a key slice of the object (its box: the
  corrected mask's) and the object is walked again from all its key slices
  (:class:`medsam.volume.KeyBoxes`: each key walks the slices nearest to it, without an IoU stop
  between keys); corrected slices keep their hand-made masks, as the workbench keeps key slices.

Printed: mean 3D DSC over the structures after 0, 1, 2, ... corrections, and the mean number of
corrections to reach 3D DSC >= ``--target`` (``--corrections + 1`` when never reached).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/key_slices.py [--checkpoint CKPT] [--corrections 3]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def box_of(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def worst_slice(result: np.ndarray, truth: np.ndarray, keys: set[int]) -> int | None:
    """The slice (not already a key) with the lowest DSC where the label or the result is present."""
    candidates = [
        (dice(result[s], truth[s]), s)
        for s in range(truth.shape[0])
        if s not in keys and (truth[s].any() or result[s].any())
    ]
    candidates = [c for c in candidates if c[0] < 1.0 and truth[c[1]].any()]
    return min(candidates)[1] if candidates else None


def main() -> int:
    import medsam
    from medsam.demo import samples_dir
    from medsam.embedding_cache import EmbeddingCache
    from medsam.io import read_image
    from medsam.volume import Box2D, KeyBoxes, segment_volume

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--corrections", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--min-slices", type=int, default=4)
    args = parser.parse_args()

    volume = read_image(samples_dir() / "ct_volume.nii.gz").array
    labels = read_image(samples_dir() / "ct_volume_label.nii.gz").array
    model = medsam.load_model(args.checkpoint)
    predictor = medsam.Predictor(model)
    structures = [int(v) for v in np.unique(labels) if v and (labels == v).any(axis=(1, 2)).sum() >= args.min_slices]
    curves: dict[str, list[list[float]]] = {"fix slice": [], "re-propagate": []}
    needed: dict[str, list[int]] = {"fix slice": [], "re-propagate": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)  # every slice is embedded once for all runs

        def walk(prompt) -> np.ndarray:
            return segment_volume(predictor, volume, [prompt], cache=cache).labels > 0

        for label in structures:
            truth = labels == label
            present = np.flatnonzero(truth.any(axis=(1, 2)))
            middle = int(present[len(present) // 2])
            start = walk(Box2D(*box_of(truth[middle]), slice=middle))
            for mode in curves:
                result = start.copy()
                keys = {middle: box_of(truth[middle])}
                corrected: list[int] = []
                scores = [dice(result, truth)]
                for _ in range(args.corrections):
                    s = worst_slice(result, truth, set(keys))
                    if s is None:
                        scores.append(scores[-1])
                        continue
                    keys[s] = box_of(truth[s])
                    corrected.append(s)
                    if mode == "re-propagate":
                        result = walk(KeyBoxes(tuple(keys.values()), tuple(keys)))
                    result[corrected] = truth[corrected]
                    scores.append(dice(result, truth))
                curves[mode].append(scores)
                reached = [i for i, v in enumerate(scores) if v >= args.target]
                needed[mode].append(reached[0] if reached else args.corrections + 1)
            print(
                f"label {label:3d}: {len(present):2d} slices, DSC fix slice "
                + " ".join(f"{v:.3f}" for v in curves["fix slice"][-1])
                + " | re-propagate "
                + " ".join(f"{v:.3f}" for v in curves["re-propagate"][-1]),
                flush=True,
            )
    print(f"\n{len(structures)} structures of >= {args.min_slices} slices; mean 3D DSC after n corrections:")
    print(f"{'corrections':14s} " + " ".join(f"{n:>6d}" for n in range(args.corrections + 1)))
    for mode, rows in curves.items():
        mean = np.mean(np.asarray(rows), axis=0)
        print(f"{mode:14s} " + " ".join(f"{v:6.3f}" for v in mean))
    for mode, counts in needed.items():
        print(
            f"{mode}: {np.mean(counts):.2f} corrections on average to reach DSC {args.target} (cap {args.corrections + 1})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
