"""A corpus of synthetic lesions on the real slices of another corpus, for evaluation.

``write_lesion_corpus(SOURCE, OUT, split="test")`` takes every grey-level slice of one split of a
corpus and writes ``variants`` copies of it, each with one lesion pasted in by
:func:`medsam.train.lesions.paste_lesion` (inside a labelled structure that holds it), whose label
map holds only the lesion: label 1 ``tumour``, 2 ``cyst``, 3 ``nodule``, 4 ``mass``. ``medsam
benchmark --corpus OUT`` then scores any model or baseline on them, per kind (``per-structure``). The
lesions are drawn from ``seed``; use another seed than a training run's so that no evaluated
lesion was trained on (training draws from the run's ``train.seed``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..corpus import index_corpus, load_slice, read_json, read_manifest, write_case
from ..train.lesions import LESION_KINDS, seeded_lesion

LESION_LABELS = {"tumour": 1, "cyst": 2, "nodule": 3, "mass": 4}  # label values in the written label maps
assert set(LESION_LABELS) == set(LESION_KINDS)


def write_lesion_corpus(
    source: str | Path,
    out: str | Path,
    split: str = "test",
    variants: int = 3,
    seed: int = 2027,
    kinds: Sequence[str] = tuple(LESION_KINDS),
    datasets: Sequence[str] = (),
) -> dict:
    """Write the lesion corpus of ``split`` of ``source`` (only ``datasets`` when given) into
    ``out``; returns its counts.

    Each case keeps its dataset name with ``_lesions`` appended, its case name, modality and
    spacing; slice ``s`` of the source becomes slices ``s * variants + k`` (k < ``variants``).
    Raises ValueError when the split has no grey-level slice or a kind is unknown.
    """
    source, out = Path(source), Path(out)
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    if not kinds or not set(kinds) <= set(LESION_KINDS):
        raise ValueError(f"lesion kinds must be among {sorted(LESION_KINDS)}, got {list(kinds)}")
    rows = read_manifest(source, split, datasets)
    by_case: dict[tuple[str, str], list] = defaultdict(list)
    seen: set[str] = set()
    for row in rows:
        if row.path not in seen:
            seen.add(row.path)
            by_case[(row.dataset, row.case)].append(row)
    names = {str(value): name for name, value in LESION_LABELS.items()}
    written_datasets = []
    written = 0
    for (dataset, case), case_rows in sorted(by_case.items()):
        slices = []
        spacing: tuple[float, float] = (1.0, 1.0)
        for row in sorted(case_rows, key=lambda r: r.slice):
            image, labels, spacing = load_slice(source, row)
            if image.ndim != 2:
                continue
            for k in range(variants):
                lesion = seeded_lesion(image, labels, seed, row.path, k, kinds)
                label = np.where(lesion.mask, LESION_LABELS[lesion.kind], 0).astype(np.uint8)
                slices.append((row.slice * variants + k, lesion.image, label))
        if not slices:
            continue
        original = read_json(source / "cases" / dataset / case / "case.json") or {}
        name = f"{dataset}_lesions"
        write_case(
            out,
            name,
            case,
            slices,
            spacing,
            {
                "modality": case_rows[0].modality,
                "split": split,
                "label_names": names,
                "label_source": "synthetic lesions (medsam.train.lesions) on real slices",
                "source": {"corpus": str(source), "dataset": dataset, "case": case, "seed": seed},
                "source_label_source": original.get("label_source"),
            },
        )
        written_datasets.append({"name": name, "label_source": "synthetic lesions", "seed": seed, "variants": variants})
        written += len(slices)
    if not written:
        which = f" of {', '.join(datasets)}" if datasets else ""
        raise ValueError(f"{source}: the {split} split{which} has no grey-level slice to put a lesion on")
    return index_corpus(out, written_datasets)
