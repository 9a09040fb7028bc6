"""Validation during training: DSC and NSD (2 mm) per modality, through the Predictor's own path,
shared among the ranks of a distributed run.

Each validation slice is prepared by the contract (in DataLoader workers), embedded once, and each of
its objects is segmented with the exact ground-truth box (no jitter) by
:meth:`medsam.predictor.Predictor.predict`, i.e. box transform, decoder, sigmoid, bilinear resize to
the original size and threshold, as a user's inference would. DSC and NSD are computed at the
original resolution with the slice's spacing (row, col).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..metrics import dice_score, normalized_surface_dice
from ..model.sam import MedSAMModel
from ..predictor import Predictor
from .data import SliceObjects, ValidationSlices
from .distributed import DistInfo, all_gather_objects

NSD_TOLERANCE_MM = 2.0


def _collate_slices(items: list[SliceObjects]) -> list[SliceObjects]:
    return items


def per_object_scores(
    model: MedSAMModel,
    slices: ValidationSlices,
    batch_size: int = 4,
    workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict]:
    """One dict per object: ``modality``, ``dsc``, ``nsd`` and ``order`` (the slice's position in
    the whole validation list, the object's in the slice). Slices that carry their pixels
    (``ValidationSlices(pixels=True)``) are segmented with the model's zoom recipe, as
    :class:`~medsam.predictor.Predictor` does by default; else on whole images. The model is left
    in eval mode."""
    predictor = Predictor(model, zoom="auto" if slices.pixels else False)  # sets eval mode; the model's contract
    device = model.device
    loader = DataLoader(slices, batch_size=batch_size, num_workers=workers, collate_fn=_collate_slices)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    rows = []
    ids = iter(slices.slice_ids)
    with torch.inference_mode():
        for items in loader:
            images = torch.stack([it.image for it in items]).to(device)
            with amp:
                embeddings = model.embed_image(images)
            for k, it in enumerate(items):
                slice_id = next(ids)
                predictor.set_embedding(embeddings[k : k + 1].float(), it.original_size, image=it.pixels)
                with amp:
                    pred = predictor.predict(boxes=it.boxes)
                for j, (mask, gt) in enumerate(zip(pred.masks, it.masks)):
                    rows.append(
                        {
                            "order": (slice_id, j),
                            "modality": it.modality,
                            "dsc": dice_score(mask, gt),
                            "nsd": normalized_surface_dice(mask, gt, it.spacing, NSD_TOLERANCE_MM),
                        }
                    )
    predictor.reset_image()
    return rows


def summarize_by_modality(rows: Sequence[dict]) -> dict[str, dict]:
    """``{modality: {"dsc", "nsd", "n"}}`` means per modality plus ``"all"`` (mean over objects)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["modality"]].append(r)
    out = {
        m: {
            "dsc": float(np.mean([r["dsc"] for r in g])),
            "nsd": float(np.mean([r["nsd"] for r in g])),
            "n": len(g),
        }
        for m, g in sorted(groups.items())
    }
    if rows:
        out["all"] = {
            "dsc": float(np.mean([r["dsc"] for r in rows])),
            "nsd": float(np.mean([r["nsd"] for r in rows])),
            "n": len(rows),
        }
    return out


def validate(
    model: MedSAMModel,
    slices: ValidationSlices,
    batch_size: int = 4,
    workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    info: DistInfo | None = None,
) -> dict[str, dict]:
    """Validation metrics per modality (see :func:`summarize_by_modality`); restores train mode.

    With ``info`` of several ranks, each rank scores its part of the slices (``slices`` built with
    ``part=(rank, world_size)``) and the per-object scores of all ranks are gathered, in the
    order of the whole list, so that every rank returns what one process scoring every slice
    would."""
    was_training = model.training
    try:
        rows = per_object_scores(model, slices, batch_size, workers, autocast_dtype)
    finally:
        model.train(was_training)
    if info is not None and info.distributed:
        rows = sorted((r for part in all_gather_objects(rows, info) for r in part), key=lambda r: r["order"])
    return summarize_by_modality(rows)
