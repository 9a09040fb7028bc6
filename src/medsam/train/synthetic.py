"""A tiny synthetic corpus in the curated format, for tests and CPU smoke runs.

Each slice is noise with two bright shapes: label 1 an ellipse, label 2 a rectangle (random sizes
and positions, not overlapping), written through :mod:`medsam.corpus` like a curated case. Cases
are split train / val / test by case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..corpus import index_corpus, write_case


def _slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    image = rng.normal(60, 20, (size, size))
    label = np.zeros((size, size), np.uint8)
    # ellipse on the left half, rectangle on the right half: never overlapping
    cy, cx = rng.uniform(0.3, 0.7) * size, rng.uniform(0.18, 0.32) * size
    ry, rx = rng.uniform(0.1, 0.2) * size, rng.uniform(0.08, 0.15) * size
    ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    label[ellipse] = 1
    h, w = int(rng.uniform(0.15, 0.35) * size), int(rng.uniform(0.1, 0.3) * size)
    y0, x0 = int(rng.uniform(0.05, 0.9 - h / size) * size), int(rng.uniform(0.55, 0.95 - w / size) * size)
    label[y0 : y0 + h, x0 : x0 + w] = 2
    image[label == 1] += rng.uniform(90, 140)
    image[label == 2] += rng.uniform(60, 110)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_synthetic_corpus(
    folder: str | Path,
    cases: dict[str, int] | None = None,
    slices_per_case: int = 4,
    size: int = 64,
    seed: int = 0,
    modalities: tuple[str, ...] = ("CT", "MR"),
) -> Path:
    """Write a corpus with ``cases`` = {split: number of cases} (default 6 train, 2 val, 1 test).

    Cases alternate between ``modalities`` (one dataset per modality); spacing is (0.8, 0.8) mm.
    Returns the corpus folder.
    """
    folder = Path(folder)
    cases = cases or {"train": 6, "val": 2, "test": 1}
    rng = np.random.default_rng(seed)
    names = {"1": "ellipse", "2": "rectangle"}
    datasets = set()
    n = 0
    for split, count in cases.items():
        for _ in range(count):
            modality = modalities[n % len(modalities)]
            dataset, case = f"synthetic_{modality.lower()}", f"case{n:03d}"
            n += 1
            slices = [(s, *_slice(rng, size)) for s in range(slices_per_case)]
            write_case(
                folder,
                dataset,
                case,
                slices,
                (0.8, 0.8),
                {"modality": modality, "split": split, "label_names": names, "label_source": "synthetic"},
            )
            datasets.add(dataset)
    index_corpus(
        folder, [{"name": d, "label_source": "synthetic", "seed": seed, "size": size} for d in sorted(datasets)]
    )
    return folder
