"""The accepted labels of a workbench as a training corpus, split by image for held-out scoring.

Every image whose label map has a saved version (an accepted label) and at least one labelled
pixel becomes one case of a corpus in ``medsam train``'s format (:mod:`medsam.corpus`): one
``.npz`` per labelled slice holding the slice *exactly as the model sees it in the workbench* (the
datastore's uint8 model input) and its label map, one manifest row per (slice, label). The label
files are read from disk again (not from the server's cache), inside ``.medsam/labels`` only.

The split is by image, deterministic and stable (:func:`split_images`): an image is held out when
the first 8 bytes of ``sha256("medsam-holdout/" + image id)``, read as a fraction of 2**64, fall
below :data:`HOLDOUT_FRACTION`. Adding images never moves an existing one, and no slice of a
held-out volume is trained on. Held-out cases carry the manifest split ``test``, training cases
``train``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .jobs import JobFailed
from .labels import LabelStore
from .security import UnsafePathError, resolve_inside, safe_relative_path

__all__ = [
    "DATASET",
    "HELDOUT_SPLIT",
    "HOLDOUT_FRACTION",
    "HOLDOUT_RULE",
    "MIN_ACCEPTED_IMAGES",
    "TRAIN_SPLIT",
    "CorpusInfo",
    "JobCancelled",
    "holdout_fraction_of",
    "read_accepted_label",
    "split_images",
    "write_accepted_corpus",
]

HOLDOUT_FRACTION = 0.2
MIN_ACCEPTED_IMAGES = 2
DATASET = "workbench"
TRAIN_SPLIT, HELDOUT_SPLIT = "train", "test"


class JobCancelled(Exception):
    """The running training job was cancelled."""


# ----------------------------------------------------------------------------- split
HOLDOUT_RULE = "sha256('medsam-holdout/' + image id) < fraction"  # as recorded in training.json


def holdout_fraction_of(image_id: str) -> float:
    """The image's place in [0, 1): first 8 bytes of ``sha256("medsam-holdout/" + id)`` / 2**64."""
    digest = hashlib.sha256(("medsam-holdout/" + image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def split_images(image_ids: list[str], fraction: float = HOLDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` image ids: held out when :func:`holdout_fraction_of` < ``fraction``.

    With two or more images, at least one lands on each side: if none is held out, the image
    with the smallest value is; if all are, the one with the largest value is trained on.
    """
    ids = sorted(set(image_ids))
    if len(ids) < 2:
        raise ValueError("need at least two images to split")
    value = {i: holdout_fraction_of(i) for i in ids}
    held = [i for i in ids if value[i] < fraction]
    if not held:
        held = [min(ids, key=value.__getitem__)]
    if len(held) == len(ids):
        held.remove(max(ids, key=value.__getitem__))
    train = [i for i in ids if i not in held]
    return train, sorted(held)


# ----------------------------------------------------------------------------- corpus
@dataclass
class CorpusInfo:
    folder: Path
    train_images: list[str]
    heldout_images: list[str]
    train_objects: int
    heldout_objects: int
    case_to_image: dict[str, str]
    skipped: list[str] = field(default_factory=list)  # accepted, but no labelled pixel
    train_slices: int = 0


def _case_name(image_id: str) -> str:
    """A folder-safe, unique case name for an image id."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)[:80]
    if not safe[:1].isalnum():
        safe = "i" + safe
    return f"{safe}-{hashlib.sha256(image_id.encode('utf-8')).hexdigest()[:8]}"


def read_accepted_label(labels: LabelStore, image_id: str, like) -> tuple[dict, np.ndarray]:
    """``(sidecar record, label map)`` of an accepted image, read from its file on disk.

    The file named by the sidecar must lie inside the labels folder. Raises :class:`JobFailed`
    (422) for an unreadable or mismatched file.
    """
    from ..io import read_image

    try:
        rec = labels.record(image_id)
    except RuntimeError as exc:
        raise JobFailed(str(exc), 422) from None
    name = rec.get("label_file")
    if not rec.version or not name:
        raise JobFailed(f"{image_id!r} has no saved label", 422)
    try:
        path = resolve_inside(labels.dir.resolve(), safe_relative_path(str(name)))
    except UnsafePathError as exc:
        raise JobFailed(f"label file of {image_id!r} refused: {exc}", 422) from None
    try:
        array = np.asarray(read_image(path).array)
    except Exception as exc:  # any reader failure: a damaged file
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise JobFailed(f"cannot read the label file of {image_id!r}: {first}", 422) from None
    if array.shape != tuple(like.spatial_shape):
        raise JobFailed(f"label file of {image_id!r} has shape {array.shape}, the image {like.spatial_shape}", 422)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise JobFailed(f"label file of {image_id!r} holds values outside 0..255", 422)
    return rec, array.astype(np.uint8, copy=False)


def write_accepted_corpus(
    datastore,
    labels: LabelStore,
    image_ids: list[str],
    folder: Path,
    modality: str | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> CorpusInfo:
    """Write the accepted labels of ``image_ids`` as a corpus in ``folder`` (module docstring).

    Images without a labelled pixel are skipped; the split is made over the rest. Raises
    :class:`JobFailed` (422) when fewer than :data:`MIN_ACCEPTED_IMAGES` remain.
    """
    from ..corpus import index_corpus, write_case

    usable: dict[str, tuple[Any, dict, np.ndarray, list[int]]] = {}
    skipped = []
    for image_id in image_ids:
        if cancelled():
            raise JobCancelled()
        try:
            loaded = datastore.load(image_id)
        except Exception as exc:  # vanished or unreadable image
            raise JobFailed(f"cannot read image {image_id!r}: {str(exc).splitlines()[0][:300]}", 422) from None
        rec, label = read_accepted_label(labels, image_id, loaded.image)
        planes = label if loaded.image.is_volume else label[None]
        kept = [int(k) for k in np.flatnonzero(planes.reshape(planes.shape[0], -1).any(axis=1))]
        if kept:
            usable[image_id] = (loaded, rec, planes, kept)
        else:
            skipped.append(image_id)
    if len(usable) < MIN_ACCEPTED_IMAGES:
        raise JobFailed(
            f"need accepted labels on at least {MIN_ACCEPTED_IMAGES} images (one to train on, one held out "
            f"to score), found {len(usable)} with a labelled pixel",
            422,
        )
    train, held = split_images(list(usable))
    heldout = set(held)
    folder.mkdir(parents=True, exist_ok=True)
    case_to_image = {}
    counts = {TRAIN_SPLIT: 0, HELDOUT_SPLIT: 0}
    slice_counts = {TRAIN_SPLIT: 0, HELDOUT_SPLIT: 0}
    for image_id, (loaded, rec, planes, kept) in usable.items():
        if cancelled():
            raise JobCancelled()
        image = loaded.image
        split = HELDOUT_SPLIT if image_id in heldout else TRAIN_SPLIT
        names = {int(d["value"]): str(d["name"]) for d in rec.get("labels") or [] if "value" in d and "name" in d}
        present = sorted(int(v) for v in np.unique(planes[kept]) if v)
        case = _case_name(image_id)
        written = write_case(
            folder,
            DATASET,
            case,
            ((k, loaded.model_slice(k), planes[k]) for k in kept),
            list(image.spacing_zyx)[-2:],
            {
                "modality": image.modality or modality or "unknown",
                "label_source": "manual (workbench)",
                "source": {
                    "image_id": image_id,
                    "label_file": rec.get("label_file"),
                    "label_version": rec.version,
                    "label_sha256": rec.get("label_sha256"),
                },
                "geometry": {
                    "shape": list(image.spatial_shape),
                    "is_color": image.is_color,
                    "spacing_zyx": list(image.spacing_zyx),
                    "source_format": image.source_format,
                },
                "normalization": {
                    "recipe": "workbench model input (medsam.segment.to_model_input)",
                    "modality": modality,
                },
                "label_names": {str(v): names.get(v, f"label {v}") for v in present},
                "split": split,
            },
        )
        counts[split] += int(written["n_objects"])
        slice_counts[split] += int(written["n_slices"])
        case_to_image[case] = image_id
    index_corpus(
        folder,
        [
            {
                "name": DATASET,
                "modality": "mixed",
                "images": str(datastore.root),
                "labels": str(labels.dir),
                "label_source": "manual (workbench)",
                "split": {"train": 1 - HOLDOUT_FRACTION, "val": 0.0, "test": HOLDOUT_FRACTION},
                "description": "accepted labels of the MedSAM workbench; split by a hash of the image id",
            }
        ],
    )
    return CorpusInfo(
        folder,
        train,
        held,
        counts[TRAIN_SPLIT],
        counts[HELDOUT_SPLIT],
        case_to_image,
        skipped,
        slice_counts[TRAIN_SPLIT],
    )
