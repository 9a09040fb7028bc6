"""Score a specialist on a corpus split, object by object, with ``medsam benchmark``'s outputs.

For each slice of the split (of the specialist's datasets unless others are named) the network
predicts one label map (:meth:`Specialist.predict`: the slice prepared as in training, the logits
framed back to the stored slice's grid and orientation, arg-max, channel -> label id); each
manifest row (object) is then scored as in :func:`medsam.benchmark.run_benchmark`:
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import benchmark as _bench
from ..corpus import load_slice, read_manifest
from ..metrics import dice_score, normalized_surface_dice
from .data import CaseOrientations
from .model import Specialist, load_specialist

OBJECT_COLUMNS = tuple(_bench.OBJECT_COLUMNS) + ("in_classes",)
SLICE_COLUMNS = tuple(_bench.SLICE_COLUMNS)
ERROR_COLUMNS = tuple(_bench.ERROR_COLUMNS)
SUMMARY_COLUMNS = tuple(_bench.SUMMARY_COLUMNS)
summarize_objects = _bench.summarize


@dataclass
class SpecialistEvaluation:
    out_dir: Path
    method: str
    objects: list[dict]
    slices: list[dict]
    errors: list[dict]
    summary: list[dict]
    info: dict = field(default_factory=dict)

    def overall(self) -> dict:
        return next(r for r in self.summary if r["level"] == "all")


@torch.no_grad()
def _predict_timed(
    model: Specialist, image: np.ndarray, spacing, orientation, device
) -> tuple[np.ndarray, float, float]:
    t0 = time.perf_counter()
    x = model.prepare(image, spacing, orientation)[None].to(device)
    logits = model.net(x).float()
    t1 = time.perf_counter()
    label_map = model.labels_from_logits(logits[0], image.shape[:2], spacing, orientation)
    t2 = time.perf_counter()
    return label_map, t1 - t0, t2 - t1


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
    orientations = CaseOrientations(corpus, enabled=model.reorient)
    classes = set(model.classes.labels[1:])
    groups = _bench.group_by_slice(rows)
    objects: list[dict] = []
    slices: list[dict] = []
    errors: list[dict] = []

    def error(r, message: str) -> None:
        errors.append(_bench.error_row(r, message))

    warmed = False
    start_all = time.perf_counter()
    for s_index, (path, srows) in enumerate(groups.items()):
        try:
            image, label_map, spacing = load_slice(corpus, srows[0])
        except Exception as exc:  # unreadable slice: report its rows, go on
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            for r in srows:
                error(r, f"slice unreadable: {type(exc).__name__}: {text}")
            continue
        H, W = label_map.shape
        kept = []
        for r in srows:
            if not (label_map == r.label).any():
                error(r, f"label {r.label} is not on its slice")
            else:
                kept.append(r)
        if not kept:
            continue
        if not warmed:
            _predict_timed(model, image, spacing, orientations(kept[0]), device)  # one untimed warm-up
            warmed = True
        pred_map, embed_s, decode_s = _predict_timed(model, image, spacing, orientations(kept[0]), device)
        for r in kept:
            gt = label_map == r.label
            mask = pred_map == r.label
            objects.append(
                {
                    "dataset": r.dataset,
                    "case": r.case,
                    "slice": r.slice,
                    "label": r.label,
                    "label_name": r.label_name,
                    "group": _bench.structure_group(r.label_name),
                    "modality": r.modality,
                    "split": r.split,
                    "x0": r.x0,
                    "y0": r.y0,
                    "x1": r.x1,
                    "y1": r.y1,
                    "px0": None,
                    "py0": None,
                    "px1": None,
                    "py1": None,
                    "area": int(gt.sum()),
                    "pred_area": int(mask.sum()),
                    "score": None,
                    "dsc": dice_score(mask, gt),
                    "nsd": normalized_surface_dice(mask, gt, spacing, tolerance_mm),
                    "embed_s": embed_s,
                    "decode_s": decode_s,
                    "objects_in_slice": len(kept),
                    "height": H,
                    "width": W,
                    "spacing_row": spacing[0],
                    "spacing_col": spacing[1],
                    "in_classes": int(r.label in classes),
                }
            )
        slices.append(
            {
                "dataset": kept[0].dataset,
                "case": kept[0].case,
                "slice": kept[0].slice,
                "path": path,
                "modality": kept[0].modality,
                "height": H,
                "width": W,
                "objects": len(kept),
                "embed_s": embed_s,
                "decode_s": decode_s,
                "peak_rss_mb": _bench._peak_rss_mb(),
                "peak_cuda_mb": None,
            }
        )
        if (s_index + 1) % 20 == 0 or s_index + 1 == len(groups):
            log(
                f"{method_name}: {s_index + 1}/{len(groups)} slices, {len(objects)} objects, "
                f"{time.perf_counter() - start_all:.0f} s"
            )
    total_s = time.perf_counter() - start_all
    if not objects:
        raise ValueError(
            f"no object could be scored ({len(errors)} errors; first: {errors[0]['error'] if errors else '-'})"
        )

    summary = _bench.summarize(objects, slices)
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
        "medsam": _bench._version(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _bench._write_csv(out / "objects.csv", OBJECT_COLUMNS, objects)
    _bench._write_csv(out / "slices.csv", SLICE_COLUMNS, slices)
    _bench._write_csv(out / "errors.csv", ERROR_COLUMNS, errors)
    _bench._write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary)
    plot_note = "plot not requested"
    if plot:
        _, plot_note = _bench.plot_dsc_by_structure(summary, out / "dsc_by_structure.png", title=method_name)
    info["plot"] = plot_note
    (out / "summary.md").write_text(_summary_markdown(summary, info, errors))
    (out / "run.json").write_text(json.dumps(info, indent=2))
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
