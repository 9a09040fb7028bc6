"""The evaluation engine: score a method on the objects of a corpus split, one loop for everyone.

``medsam benchmark`` (a model or a baseline), the specialist U-Net's evaluation and the
workbench's before/after scoring of a training job all call :func:`score_objects`, so they share
the prompt construction, the metrics and the statistics:

* **Objects** are manifest rows (:class:`medsam.corpus.ManifestRow`), read a slice at a time
  (:func:`medsam.corpus.group_by_slice`): one image read and one embedding per slice for all its objects.
* **Prompts** (:func:`object_box`): the manifest's ground-truth box, inclusive pixels; a side of
  zero width is closed on its far side (``x1 = x0 + 1``, the predictor's far edge, so a one-pixel
  object is scored, not dropped); optionally jittered outwards by ``randint(0, J')`` per side
  with ``J' = round(J * max(H, W) / 1024)`` (``J`` pixels at a 1024-pixel longest side, as
  MedSAM's training jitter), seeded per object by ``(seed, dataset, case, slice, label)`` so every
  method sees the same boxes whatever the subset.
* **Scores** per object at the slice's resolution: DSC and NSD at ``tolerance_mm`` with the
  slice spacing (:mod:`medsam.metrics`); embedding and decoding time per slice; rows that cannot
  be scored (unreadable slice, label absent from its slice, box outside the image) become error
  rows and the run goes on.
* **Statistics** (:func:`summarize`): per level (all, modality, dataset, case, structure group,
  structure) the mean, population standard deviation and median over objects, and for the
  aggregate levels the mean over structures of their per-structure means.

A method (:class:`SliceMethod`) embeds a slice once and segments its objects from boxes:
:class:`PredictorMethod` is a model through :class:`medsam.predictor.Predictor` (with zoom and an
embedding cache if asked); the benchmark's baselines and the specialist bring their own.
"""

from __future__ import annotations

import re
import sys
import time
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .corpus import group_by_slice

__all__ = [
    "ERROR_COLUMNS",
    "LEVELS",
    "OBJECT_COLUMNS",
    "SLICE_COLUMNS",
    "SUMMARY_COLUMNS",
    "PredictorMethod",
    "ScoredObjects",
    "SliceMethod",
    "error_row",
    "jitter_box",
    "mean_scores",
    "object_box",
    "paired_bootstrap",
    "score_objects",
    "select_objects",
    "structure_group",
    "summarize",
]

OBJECT_COLUMNS = (
    "dataset",
    "case",
    "slice",
    "label",
    "label_name",
    "group",
    "modality",
    "split",
    "x0",
    "y0",
    "x1",
    "y1",
    "px0",
    "py0",
    "px1",
    "py1",
    "area",
    "pred_area",
    "score",
    "dsc",
    "nsd",
    "embed_s",
    "decode_s",
    "objects_in_slice",
    "height",
    "width",
    "spacing_row",
    "spacing_col",
)
SLICE_COLUMNS = (
    "dataset",
    "case",
    "slice",
    "path",
    "modality",
    "height",
    "width",
    "objects",
    "embed_s",
    "decode_s",
    "peak_rss_mb",
    "peak_cuda_mb",
)
ERROR_COLUMNS = ("dataset", "case", "slice", "label", "label_name", "path", "error")
SUMMARY_COLUMNS = (
    "level",
    "dataset",
    "case",
    "modality",
    "group",
    "structure",
    "objects",
    "structures",
    "dsc_mean",
    "dsc_std",
    "dsc_median",
    "nsd_mean",
    "nsd_std",
    "nsd_median",
    "dsc_structure_mean",
    "nsd_structure_mean",
    "slices",
    "embed_s_mean",
    "decode_s_mean",
)
LEVELS = ("all", "modality", "dataset", "case", "group", "structure")


# --------------------------------------------------------------------------- methods
class SliceMethod(Protocol):
    """What :func:`score_objects` asks of a method.

    ``prompted``: whether the method takes the objects' boxes (False for automatic methods:
    ``segment`` then gets ``None``). ``warm_up``: whether one untimed ``embed`` should run first.
    """

    prompted: bool
    warm_up: bool

    def embed(self, image: np.ndarray, spacing: tuple[float, float], rows: Sequence[Any]) -> float:
        """Per-slice work before any prompt (an embedding); returns its seconds."""

    def segment(
        self, image: np.ndarray, boxes: np.ndarray | None, rows: Sequence[Any]
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(N, H, W) bool masks, (N,) scores (NaN when the method has none) and the seconds, for
        the N ``rows`` (with their (N, 4) ``boxes`` when prompted)."""

    def reset_peak(self) -> None: ...

    def peak_cuda_mb(self) -> float | None: ...

    def object_fields(self, row: Any) -> dict[str, Any]:
        """Extra columns of one object's row."""


class PredictorMethod:
    """A model through the :class:`~medsam.predictor.Predictor`: each slice embedded once (through
    ``cache`` when given), all its boxes decoded in one call; small boxes on a magnified crop as
    ``zoom`` says (what :class:`~medsam.predictor.Predictor` takes; default None: never)."""

    prompted = True
    warm_up = True

    def __init__(
        self, model: Any, contract: str | None = None, precision: str | None = None, zoom: Any = None, cache: Any = None
    ) -> None:
        import torch

        from .predictor import Predictor

        self.torch = torch
        self.predictor = Predictor(model, contract=contract, precision=precision, zoom=False if zoom is None else zoom)
        self.cache = cache
        self.device = self.predictor.device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def embed(self, image: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0), rows: Sequence[Any] = ()) -> float:
        from .embedding_cache import set_image_cached

        self._sync()
        start = time.perf_counter()
        set_image_cached(self.predictor, image, self.cache)
        self._sync()
        return time.perf_counter() - start

    def segment(
        self, image: np.ndarray, boxes: np.ndarray | None, rows: Sequence[Any] = ()
    ) -> tuple[np.ndarray, np.ndarray, float]:
        assert boxes is not None
        self._sync()
        start = time.perf_counter()
        prediction = self.predictor.predict(boxes=boxes)  # small boxes on their crops with zoom
        self._sync()
        return prediction.masks, np.asarray(prediction.scores, dtype=np.float64), time.perf_counter() - start

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_cuda_mb(self) -> float | None:
        if self.device.type == "cuda":
            return float(self.torch.cuda.max_memory_allocated(self.device)) / 2**20
        return None

    def object_fields(self, row: Any) -> dict[str, Any]:
        return {}

    def finish(self) -> None:
        """Drop the last embedding."""
        self.predictor.reset_image()


# --------------------------------------------------------------------------- prompts
_SIDE_TOKENS = {"left", "right", "l", "r"}
_NUMBER_TOKEN = re.compile(r"^[A-Z]?\d+$")


def structure_group(name: str) -> str:
    """The structure group of a label name: without tokens ``left``/``right``/``L``/``R`` and
    tokens that are a number, optionally after one capital letter (``rib_left_10`` -> ``rib``,
    ``vertebrae_T12`` -> ``vertebrae``); the name itself if nothing is left."""
    tokens = [t for t in re.split(r"[_\s]+", name) if t]
    kept = [t for t in tokens if t.lower() not in _SIDE_TOKENS and not _NUMBER_TOKEN.match(t)]
    return "_".join(kept) if kept else name


def _object_rng(seed: int, dataset: str, case: str, slice_index: int, label: int) -> np.random.Generator:
    key = zlib.crc32(f"{dataset}/{case}/{slice_index}/{label}".encode())
    return np.random.default_rng([int(seed), key])


def jitter_box(
    box: Sequence[float] | np.ndarray, jitter: float, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Move each side of an inclusive [x0, y0, x1, y1] box outwards by randint(0, J') pixels,
    ``J' = round(jitter * max(H, W) / 1024)``; clipped to the (H, W) image."""
    H, W = size
    x0, y0, x1, y1 = (float(v) for v in box)
    limit = int(round(float(jitter) * max(H, W) / 1024.0))
    if limit <= 0:
        return np.array([x0, y0, x1, y1], dtype=np.float64)
    d = rng.integers(0, limit + 1, size=4)
    return np.array(
        [max(0.0, x0 - d[0]), max(0.0, y0 - d[1]), min(W - 1.0, x1 + d[2]), min(H - 1.0, y1 + d[3])],
        dtype=np.float64,
    )


def object_box(row: Any, size: tuple[int, int], jitter: float = 0.0, seed: int = 0) -> np.ndarray | str:
    """The prompt box of a manifest row (module docstring), or the reason it has none."""
    H, W = size
    x0, y0, x1, y1 = row.x0, row.y0, row.x1, row.y1
    if not (0 <= x0 <= x1 < W and 0 <= y0 <= y1 < H):
        return f"box [{x0}, {y0}, {x1}, {y1}] is outside the {W}x{H} image"
    box = np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], dtype=np.float64)
    if jitter > 0:
        box = jitter_box(box, jitter, (H, W), _object_rng(seed, row.dataset, row.case, row.slice, row.label))
        box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
    return box


# --------------------------------------------------------------------------- rows
def select_objects(rows: Sequence[Any], max_objects: int | None, seed: int) -> tuple[list[Any], dict[str, Any]]:
    """At most ``max_objects`` rows per dataset (a seeded random subset, in manifest order), and
    what was subsampled: ``{dataset: {"rows": n, "kept": k}}``."""
    if not max_objects:
        return list(rows), {}
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_dataset[r.dataset].append(i)
    keep: set[int] = set()
    subsampled = {}
    rng = np.random.default_rng(seed)
    for dataset in sorted(by_dataset):
        idx = by_dataset[dataset]
        if len(idx) > max_objects:
            chosen = rng.choice(len(idx), size=max_objects, replace=False)
            keep.update(idx[int(c)] for c in chosen)
            subsampled[dataset] = {"rows": len(idx), "kept": int(max_objects)}
        else:
            keep.update(idx)
    return [r for i, r in enumerate(rows) if i in keep], subsampled


def error_row(r: Any, message: str) -> dict[str, Any]:
    """The ``errors.csv`` row for a manifest row that could not be scored."""
    return {
        "dataset": r.dataset,
        "case": r.case,
        "slice": r.slice,
        "label": r.label,
        "label_name": r.label_name,
        "path": r.path,
        "error": message,
    }


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far (MiB), where the OS reports one."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


# --------------------------------------------------------------------------- the loop
@dataclass
class ScoredObjects:
    """Rows of :data:`OBJECT_COLUMNS` (plus a method's extra fields), :data:`SLICE_COLUMNS` and
    :data:`ERROR_COLUMNS`, and the wall time of the loop."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ScoringReport:
    """What an evaluation command computed and wrote into ``out_dir``: the method's name, the
    object, slice and error rows, the summary rows (:func:`summarize`) and run information."""

    out_dir: Path
    method: str
    objects: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def overall(self) -> dict[str, Any]:
        """The ``level == "all"`` summary row."""
        return next(r for r in self.summary if r["level"] == "all")


def score_objects(
    corpus: str | Path,
    rows: Sequence[Any],
    method: SliceMethod,
    *,
    jitter: float = 0.0,
    seed: int = 0,
    tolerance_mm: float = 2.0,
    max_slices: int | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
    name: str = "",
) -> ScoredObjects:
    """Score ``method`` on the objects ``rows`` of ``corpus`` (see the module docstring).

    ``max_slices``: score at most this many slices, evenly spaced in manifest order.
    ``cancelled`` is asked before each slice (a True answer raises :class:`InterruptedError`);
    ``progress(done, total)`` is told after each.
    """
    from .corpus import load_slice
    from .metrics import dice_score, normalized_surface_dice

    groups = group_by_slice(rows)
    paths = list(groups)
    if max_slices is not None and len(paths) > max_slices:
        picks = sorted(set(np.linspace(0, len(paths) - 1, max_slices).round().astype(int).tolist()))
        paths = [paths[i] for i in picks]
    out = ScoredObjects()
    warmed = not method.warm_up
    start_all = time.perf_counter()
    for s_index, path in enumerate(paths):
        if cancelled():
            raise InterruptedError("scoring cancelled")
        srows = groups[path]
        try:
            image, label_map, spacing = load_slice(corpus, path)
        except Exception as exc:  # unreadable slice: report its rows, go on
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            out.errors.extend(error_row(r, f"slice unreadable: {type(exc).__name__}: {reason}") for r in srows)
            continue
        H, W = label_map.shape
        boxes: list[np.ndarray] = []
        gts, kept = [], []
        for r in srows:
            gt = label_map == r.label
            box = object_box(r, (H, W), jitter, seed) if method.prompted else None
            if not gt.any():
                out.errors.append(error_row(r, f"label {r.label} is not on its slice"))
            elif isinstance(box, str):
                out.errors.append(error_row(r, box))
            else:
                if box is not None:
                    boxes.append(box)
                gts.append(gt)
                kept.append(r)
        if not kept:
            continue
        boxes_arr = np.stack(boxes) if method.prompted else None
        if not warmed:
            method.embed(image, spacing, kept)  # one untimed warm-up (allocations, kernels)
            warmed = True
        method.reset_peak()
        embed_s = method.embed(image, spacing, kept)
        masks, scores, decode_s = method.segment(image, boxes_arr, kept)
        peak_cuda, peak_rss = method.peak_cuda_mb(), peak_rss_mb()
        for i, (r, gt) in enumerate(zip(kept, gts)):
            mask, score = masks[i], scores[i]
            px = boxes_arr[i] if boxes_arr is not None else (None, None, None, None)
            out.objects.append(
                {
                    "dataset": r.dataset,
                    "case": r.case,
                    "slice": r.slice,
                    "label": r.label,
                    "label_name": r.label_name,
                    "group": structure_group(r.label_name),
                    "modality": r.modality,
                    "split": r.split,
                    "x0": r.x0,
                    "y0": r.y0,
                    "x1": r.x1,
                    "y1": r.y1,
                    "px0": px[0],
                    "py0": px[1],
                    "px1": px[2],
                    "py1": px[3],
                    "area": int(gt.sum()),
                    "pred_area": int(mask.sum()),
                    "score": float(score) if np.isfinite(score) else None,
                    "dsc": dice_score(mask, gt),
                    "nsd": normalized_surface_dice(mask, gt, spacing, tolerance_mm),
                    "embed_s": embed_s,
                    "decode_s": decode_s,
                    "objects_in_slice": len(kept),
                    "height": H,
                    "width": W,
                    "spacing_row": spacing[0],
                    "spacing_col": spacing[1],
                    **method.object_fields(r),
                }
            )
        out.slices.append(
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
                "peak_rss_mb": peak_rss,
                "peak_cuda_mb": peak_cuda,
            }
        )
        if progress is not None:
            progress(s_index + 1, len(paths))
        if (s_index + 1) % 20 == 0 or s_index + 1 == len(paths):
            log(
                f"{name}: {s_index + 1}/{len(paths)} slices, {len(out.objects)} objects, "
                f"{time.perf_counter() - start_all:.0f} s"
            )
    out.seconds = time.perf_counter() - start_all
    return out


# --------------------------------------------------------------------------- statistics
def describe(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, population standard deviation (numpy's ``ddof=0``) and median: the statistics every
    evaluation in the package reports. ``values`` must not be empty."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std()), float(np.median(a))


def mean_scores(objects: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean DSC and NSD over objects (0.0 when there are none) and their number."""
    return {
        "dsc": float(np.mean([o["dsc"] for o in objects])) if objects else 0.0,
        "nsd": float(np.mean([o["nsd"] for o in objects])) if objects else 0.0,
        "n_objects": len(objects),
    }


def paired_bootstrap(
    differences: Sequence[float] | np.ndarray,
    clusters: Sequence[Any] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The mean of paired per-object ``differences`` and its 95 % percentile bootstrap interval:
    ``(mean, low, high)``.

    ``clusters`` (one key per object, e.g. its slice) are resampled with replacement, all of a
    cluster's objects together, since objects of one slice share its image and are not
    independent; None: each object alone. Each resample's mean is over its objects.
    """
    diff = np.asarray(differences, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"differences must be a non-empty 1D sequence, got shape {diff.shape}")
    if clusters is None:
        inverse = np.arange(diff.size)
    else:
        if len(clusters) != diff.size:
            raise ValueError(f"{len(clusters)} cluster keys for {diff.size} differences")
        _, inverse = np.unique(np.array([str(c) for c in clusters]), return_inverse=True)
    sums = np.bincount(inverse, weights=diff)
    counts = np.bincount(inverse).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, sums.size, size=(resamples, sums.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(objects: Iterable[dict[str, Any]], slices: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Summary rows per level (``all``, ``modality``, ``dataset``, ``case``, ``group``, ``structure``).

    ``dsc_mean``/``nsd_mean`` are means over objects (with the population standard deviation and
    the median); ``dsc_structure_mean``/``nsd_structure_mean`` (aggregate levels) are means over the
    structures (dataset, label name) of their per-structure means, the field's per-label-then-per-
    task average. Latencies are means over slices.
    """
    objects = list(objects)
    slices = list(slices)
    keyfuncs: dict[str, Callable[[dict[str, Any]], tuple[Any, ...]]] = {
        "all": lambda o: (),
        "modality": lambda o: (o["modality"],),
        "dataset": lambda o: (o["dataset"], o["modality"]),
        "case": lambda o: (o["dataset"], o["case"], o["modality"]),
        "group": lambda o: (o["dataset"], o["modality"], o["group"]),
        "structure": lambda o: (o["dataset"], o["modality"], o["group"], o["label_name"]),
    }
    fields = {
        "all": (),
        "modality": ("modality",),
        "dataset": ("dataset", "modality"),
        "case": ("dataset", "case", "modality"),
        "group": ("dataset", "modality", "group"),
        "structure": ("dataset", "modality", "group", "structure"),
    }
    out = []
    for level in LEVELS:
        grouped: OrderedDict[tuple[Any, ...], list[dict[str, Any]]] = OrderedDict()
        for o in sorted(objects, key=lambda o: tuple(str(v) for v in keyfuncs[level](o))):
            grouped.setdefault(keyfuncs[level](o), []).append(o)
        for key, members in grouped.items():
            row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS, "")
            row["level"] = level
            row.update(dict(zip(fields[level], key)))
            row["objects"] = len(members)
            row["dsc_mean"], row["dsc_std"], row["dsc_median"] = describe([m["dsc"] for m in members])
            row["nsd_mean"], row["nsd_std"], row["nsd_median"] = describe([m["nsd"] for m in members])
            per_structure: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
            for m in members:
                per_structure[(m["dataset"], m["label_name"])].append(m)
            row["structures"] = len(per_structure)
            if level in ("all", "modality", "dataset", "case", "group"):
                for metric in ("dsc", "nsd"):
                    means = [np.mean([m[metric] for m in g]) for g in per_structure.values()]
                    row[f"{metric}_structure_mean"] = float(np.mean(means))
            if level in ("all", "modality", "dataset", "case"):
                scope = [(f, v) for f, v in zip(fields[level], key) if f in ("dataset", "case", "modality")]
                match = [s for s in slices if all(s.get(f) == v for f, v in scope)]
                if match:
                    row["slices"] = len(match)
                    row["embed_s_mean"] = float(np.mean([s["embed_s"] for s in match]))
                    row["decode_s_mean"] = float(np.mean([s["decode_s"] for s in match]))
            out.append(row)
    return out
