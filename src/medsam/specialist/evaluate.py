"""Score a specialist on a corpus split, object by object, with ``medsam benchmark``'s outputs.

For each slice of the split (of the specialist's datasets unless others are named) the network
predicts one label map (:meth:`Specialist.predict`: the slice prepared as in training, the logits
framed back to the stored slice's grid and orientation, arg-max, channel -> label id); each
manifest row (object) is then scored by the evaluation engine (:func:`medsam.scoring.score_objects`,
as ``medsam benchmark`` scores a model):
``pred = label_map == row.label`` against ``gt = slice label == row.label``, DSC and NSD at
``tolerance_mm`` (2 mm) with the slice spacing.
No prompts: the box columns ``px0..py1`` and ``score`` are empty. A test object whose label is
not one of the network's classes is still scored (its prediction is empty: DSC 0, NSD 0) and is
marked ``in_classes = 0``.

Outputs in ``out_dir``, the files and columns of ``medsam benchmark`` (so
``medsam benchmark --compare`` puts both in one table): ``objects.csv`` (the benchmark's object
columns plus ``in_classes``), ``slices.csv`` (``embed_s`` = preprocessing + network,
``decode_s`` = logits resize + arg-max), ``errors.csv``, ``summary.csv`` (levels all / modality /
dataset / case / structure group / structure), ``summary.md``, ``run.json`` and
``dsc_by_structure.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .. import benchmark as _bench
from ..corpus import read_manifest
from ..io.atomic import write_text
from ..scoring import ERROR_COLUMNS, SLICE_COLUMNS, SUMMARY_COLUMNS, ScoringReport, score_objects
from ..scoring import OBJECT_COLUMNS as _OBJECT_COLUMNS
from ..scoring import summarize as summarize_objects
from .data import CaseOrientations
from .model import Specialist, load_specialist

OBJECT_COLUMNS = (*_OBJECT_COLUMNS, "in_classes")


class SpecialistEvaluation(ScoringReport):
    """What :func:`evaluate_specialist` computed and wrote."""


class SpecialistMethod:
    """The specialist as a :class:`medsam.scoring.SliceMethod`: no prompts; ``embed`` runs the
    network on the slice (preprocessing + network), ``segment`` frames the logits back to the
    slice and takes each object's label from the arg-max (resize + arg-max)."""

    prompted = False
    warm_up = True

    def __init__(self, model: Specialist, orientations: CaseOrientations, device) -> None:
        self.model = model
        self.orientations = orientations
        self.device = device
        self.classes = set(model.classes.labels[1:])
        self._logits = None
        self._frame = None

    def embed(self, image: np.ndarray, spacing, rows) -> float:
        t0 = time.perf_counter()
        orientation = self.orientations(rows[0])
        x = self.model.prepare(image, spacing, orientation)[None].to(self.device)
        self._logits = self.model.net(x).float()
        self._frame = (image.shape[:2], spacing, orientation)
        return time.perf_counter() - t0

    def segment(self, image: np.ndarray, boxes, rows) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        size, spacing, orientation = self._frame
        label_map = self.model.labels_from_logits(self._logits[0], size, spacing, orientation)
        masks = np.stack([label_map == r.label for r in rows])
        return masks, np.full(len(rows), np.nan), time.perf_counter() - t0

    def reset_peak(self) -> None:
        pass

    def peak_cuda_mb(self) -> float | None:
        return None

    def object_fields(self, row) -> dict:
        return {"in_classes": int(row.label in self.classes)}


def evaluate_specialist(
    corpus: str | Path,
    checkpoint: str | Path | Specialist,
    out_dir: str | Path,
    *,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    tolerance_mm: float = 2.0,
    device: str = "cpu",
    name: str | None = None,
    plot: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> SpecialistEvaluation:
    """Score ``checkpoint`` (a path or a loaded :class:`Specialist`) on ``split`` of ``corpus``.

    Args:
        datasets: datasets to score (default: those the specialist was trained on).
        name: method name in the outputs (default ``specialist-unet``).
    """
    corpus = Path(corpus)
    out = Path(out_dir)
    if isinstance(checkpoint, Specialist):
        model, ckpt_path = checkpoint, None
        model.net.to(device).eval()
    else:
        model, ckpt_path = load_specialist(checkpoint, device=device), str(checkpoint)
    if datasets is None or len(datasets) == 0:
        datasets = tuple(model.info.get("datasets") or ())
    rows = read_manifest(corpus, split=split, datasets=tuple(datasets))
    if not rows:
        raise ValueError(
            f"no manifest rows in split {split!r} for datasets {', '.join(datasets) or '(all)'} of {corpus}"
        )
    method_name = name or "specialist-unet"
    method = SpecialistMethod(model, CaseOrientations(corpus, enabled=model.reorient), device)
    with torch.no_grad():
        scored = score_objects(corpus, rows, method, tolerance_mm=tolerance_mm, log=log, name=method_name)
    objects, slices, errors, total_s = scored.objects, scored.slices, scored.errors, scored.seconds
    if not objects:
        raise ValueError(
            f"no object could be scored ({len(errors)} errors; first: {errors[0]['error'] if errors else '-'})"
        )

    summary = summarize_objects(objects, slices)
    unseen = sorted({(o["label"], o["label_name"]) for o in objects if not o["in_classes"]})
    info = {
        "method": method_name,
        "kind": "specialist (automatic, no prompts)",
        "corpus": str(corpus),
        "split": split,
        "datasets": list(datasets),
        "tolerance_mm": tolerance_mm,
        "objects": len(objects),
        "slices": len(slices),
        "errors": len(errors),
        "objects_not_in_classes": sum(1 for o in objects if not o["in_classes"]),
        "labels_not_in_classes": [f"{lab} {nm}" for lab, nm in unseen],
        "seconds": round(total_s, 3),
        "checkpoint": ckpt_path,
        "architecture": "monai UNet specialist",
        "input_size": model.input_size,
        "pixel_mm": model.pixel_mm,
        "reorient": model.reorient,
        "classes": model.classes.num_classes - 1,
        "trained_on": model.info.get("datasets"),
        "training": model.info.get("training"),
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "medsam": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    _bench.write_table(out / "objects.csv", OBJECT_COLUMNS, objects)
    _bench.write_table(out / "slices.csv", SLICE_COLUMNS, slices)
    _bench.write_table(out / "errors.csv", ERROR_COLUMNS, errors)
    _bench.write_table(out / "summary.csv", SUMMARY_COLUMNS, summary)
    plot_note = "plot not requested"
    if plot:
        _, plot_note = _bench.plot_dsc_by_structure(summary, out / "dsc_by_structure.png", title=method_name)
    info["plot"] = plot_note
    write_text(out / "summary.md", _summary_markdown(summary, info, errors))
    write_text(out / "run.json", json.dumps(info, indent=2))
    return SpecialistEvaluation(out, method_name, objects, slices, errors, summary, info)


def _summary_markdown(summary: Sequence[dict], info: dict, errors: Sequence[dict]) -> str:
    """The benchmark's tables under a header that describes the specialist."""
    tables = _bench.summary_markdown(summary, info, errors)
    body = tables[tables.index("## ") :] if "## " in tables else ""
    lines = [
        f"# Specialist: {info['method']}",
        "",
        f"- corpus `{info['corpus']}`, split `{info['split']}`, datasets {', '.join(info['datasets'])}",
        f"- objects {info['objects']}, slices {info['slices']}, errors {info['errors']}, "
        f"NSD tolerance {info['tolerance_mm']} mm",
        f"- {info['kind']}: MONAI UNet, {info['classes']} structures, input {info['input_size']} px"
        + (f" at {info['pixel_mm']} mm/pixel" if info["pixel_mm"] else " (slices resized to it)")
        + (", canonical orientation" if info["reorient"] else "")
        + ", "
        f"checkpoint `{info['checkpoint']}`, {info['device']}, torch {info['torch']} with "
        f"{info['torch_threads']} threads",
        f"- objects whose label is not a class of the network (scored 0): {info['objects_not_in_classes']}"
        + (f" ({', '.join(info['labels_not_in_classes'])})" if info["labels_not_in_classes"] else ""),
        f"- total {info['seconds']} s; embed s/slice = preprocessing + network, decode s/slice = resize + arg-max",
        "",
    ]
    return "\n".join(lines) + "\n" + body
