"""``prepare``: curate medical volumes into a MedSAM-style corpus of 2D (image, label) slices.

What happens to each case (an image and its label volume), following the
MedSAM-1M recipe (Ma et al., Nat. Commun. 2024) with the release's storage
waste and spacing bug left out:

1. read image and label (:func:`medsam.io.read_image`); the label must have the
   image's geometry (``label_alignment: reorient`` also accepts the same voxel
   grid stored with flipped or permuted axes); 4D, unreadable or mismatched
   cases are reported and skipped;
2. normalise intensities by modality to uint8 at native resolution (CT window,
   else 0.5/99.5 foreground percentiles over the whole volume; colour kept);
3. ``keep_labels`` / ``drop_labels``; 3D connected components (26-connectivity)
   smaller than ``min_component_3d`` voxels removed per label; then, slice by
   slice along ``slice_axis``, 2D components (8-connectivity) smaller than
   ``min_component_2d`` pixels; then the optional instance split;
4. keep the slices that still hold a label and write one ``.npz`` per slice
   plus ``case.json``. The case folder is written under a hidden temporary name
   and renamed when complete, so a case folder that exists is finished.

Corpus layout (``OUT``)::

    corpus.json        {"format": "medsam-corpus", "version": 1, "datasets": [spec dicts],
                        "created", "updated", "medsam_version", "counts"}
    manifest.csv       one row per (slice, object): dataset, case, slice, label, label_name,
                       modality, x0, y0, x1, y1, area, split, path, height, width
    summary.csv        per dataset, modality and label: cases, slices, objects, voxels
    errors.csv         cases that could not be curated: dataset, case, stage, error, image, label
    cases/<dataset>/<case>/case.json
    cases/<dataset>/<case>/slices/<slice:04d>.npz   image (H, W[, 3]) uint8,
                       label (H, W) uint8|uint16, spacing (2,) float64 mm (row, col)
    errors/<dataset>/<case>.json   one record per broken case (errors.csv is built from them)

The split is by case, computed per dataset from its sorted case list and seed
(:func:`medsam.curate.dataset_spec.assign_splits`), so it does not depend on
sharding or workers. ``manifest.csv``, ``summary.csv`` and ``errors.csv`` are
rebuilt at the end of every run from all finished cases' ``case.json``, so
shards run on several machines merge by copying their ``cases/`` (and
``errors/``) folders into one ``OUT`` and running ``prepare(..., merge_only=True)``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..io import MedicalImage, check_same_geometry, read_image
from ..io.atomic import atomic_output
from .dataset_spec import (
    SPLITS,
    DatasetSpec,
    SpecError,
    assign_splits,
    case_list_digest,
    check_unique_names,
    load_specs,
    nifti_label_names,
)
from .normalize import _RECIPES, _scale_to_uint8, normalize_image, window_ct

__all__ = [
    "MANIFEST_COLUMNS",
    "SUMMARY_COLUMNS",
    "ERROR_COLUMNS",
    "CaseError",
    "PrepareReport",
    "prepare",
    "build_index",
    "index_corpus",
    "write_case",
    "slice_objects",
    "curate_labels",
    "align_label",
]

CORPUS_FORMAT = "medsam-corpus"
CORPUS_VERSION = 1
CASE_FORMAT = "medsam-corpus-case"

MANIFEST_COLUMNS = (
    "dataset",
    "case",
    "slice",
    "label",
    "label_name",
    "modality",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "split",
    "path",
    "height",
    "width",
)
SUMMARY_COLUMNS = (
    "dataset",
    "modality",
    "label",
    "label_name",
    "label_source",
    "cases",
    "slices",
    "objects",
    "voxels",
    "cases_train",
    "cases_val",
    "cases_test",
)
ERROR_COLUMNS = ("dataset", "case", "stage", "error", "image", "label")

_PERCENTILES = (0.5, 99.5)


# --------------------------------------------------------------------------- report
@dataclass
class CaseError:
    """A case that could not be curated (or an image/label without its partner)."""

    dataset: str
    case: str
    stage: str
    error: str
    image: str = ""
    label: str = ""


@dataclass
class PrepareReport:
    """What one :func:`prepare` run did, and what the corpus holds afterwards."""

    out_dir: Path
    datasets: list[str] = field(default_factory=list)
    n_cases: int = 0  # matched cases in this run's scope (after sharding)
    n_processed: int = 0  # curated in this run
    n_skipped: int = 0  # already finished (resume)
    n_failed: int = 0
    errors: list[CaseError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    processed: list[tuple[str, str]] = field(default_factory=list)
    corpus_cases: int = 0
    corpus_slices: int = 0
    corpus_objects: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # largest peak RSS of a process that curated a case
    shard: tuple[int, int] | None = None
    merge_only: bool = False

    @property
    def ok(self) -> bool:
        """True when no case of this run failed (unmatched files count as failures)."""
        return not self.errors

    def summary(self) -> str:
        shard = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard else ""
        lines = [
            f"prepare{shard}: {self.n_processed} case(s) curated, {self.n_skipped} already done, "
            f"{self.n_failed} failed, in {self.seconds:.1f} s",
            f"corpus {self.out_dir}: {self.corpus_cases} cases, {self.corpus_slices} slices, "
            f"{self.corpus_objects} objects; split "
            + ", ".join(f"{k} {self.splits.get(k, 0)}" for k in SPLITS),
        ]
        for e in self.errors[:20]:
            lines.append(f"  error {e.dataset}/{e.case} [{e.stage}]: {e.error}")
        if len(self.errors) > 20:
            lines.append(f"  ... {len(self.errors) - 20} more in errors.csv")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _medsam_version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"


def _write_json_atomic(path: Path, data: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _write_csv_atomic(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(columns)
            w.writerows(rows)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _case_dir(out: Path, dataset: str, case: str) -> Path:
    return out / "cases" / dataset / case


def _error_file(out: Path, dataset: str, case: str) -> Path:
    return out / "errors" / dataset / f"{case}.json"


# --------------------------------------------------------------------------- geometry
def align_label(image: MedicalImage, label: MedicalImage, mode: str = "strict") -> tuple[np.ndarray, str]:
    """The label array on the image's voxel grid, and how it got there.

    ``mode="strict"``: the geometries must match (:func:`check_same_geometry`),
    else ``ValueError``. ``mode="reorient"``: a label whose voxel centres are
    exactly the image's, stored with flipped and/or permuted index axes (e.g.
    a NIfTI written from a DICOM series with the row axis reversed), is
    flipped/transposed onto the image grid; anything else is still refused.
    Returns ``(array, "identity" | "reoriented")``.
    """
    if label.is_color:
        raise ValueError(f"label {label.source_path} is a colour image; labels must be one integer channel")
    try:
        check_same_geometry(image, label)
        return label.array, "identity"
    except ValueError as exc:
        if mode != "reorient":
            raise
        strict_error = exc
    g = image.geometry_ndim
    if label.geometry_ndim != g or image.ndim_spatial != g or label.ndim_spatial != g:
        raise strict_error
    a_img = image.direction @ np.diag(image.spacing)
    a_lab = label.direction @ np.diag(label.spacing)
    inv = np.linalg.inv(a_lab)
    m = inv @ a_img
    t = inv @ (np.asarray(image.origin) - np.asarray(label.origin))
    r = np.rint(m)
    is_perm = (
        np.allclose(m, r, atol=1e-3)
        and np.all(np.abs(r).sum(axis=0) == 1)
        and np.all(np.abs(r).sum(axis=1) == 1)
    )
    if not is_perm or not np.allclose(t, np.rint(t), atol=1e-3):
        raise ValueError(f"{strict_error}; and the label grid is not a flip/permutation of the image grid")
    t = np.rint(t).astype(int)
    size_i, size_l = image.size_xyz, label.size_xyz
    perm = [int(np.argmax(np.abs(r[:, d]))) for d in range(g)]
    sign = [int(r[perm[d], d]) for d in range(g)]
    for d in range(g):
        n = size_i[d]
        if size_l[perm[d]] != n or t[perm[d]] != (0 if sign[d] > 0 else n - 1):
            raise ValueError(
                f"{strict_error}; and the label grid does not cover the image grid exactly"
            )
    la = label.array.T  # (i, j[, k]) index order
    out = np.transpose(la, perm)
    for d in range(g):
        if sign[d] < 0:
            out = np.flip(out, axis=d)
    return np.ascontiguousarray(out.T), "reoriented"


# --------------------------------------------------------------------------- labels
def _as_label_array(lab: np.ndarray, extra_ids: int = 0) -> np.ndarray:
    """A writable unsigned copy of ``lab`` (uint8 when it fits, else uint16)."""
    lab = np.asarray(lab)
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.number) or np.issubdtype(lab.dtype, np.complexfloating):
        raise ValueError(f"label array has dtype {lab.dtype}; need integers")
    if np.issubdtype(lab.dtype, np.floating):
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.rint(lab)):
            raise ValueError("label array holds non-integer values; labels must be integer ids")
    lo = lab.min() if lab.size else 0
    hi = int(lab.max()) if lab.size else 0
    if lo < 0:
        raise ValueError(f"label array holds negative ids (minimum {lo})")
    if hi > np.iinfo(np.uint16).max:
        raise ValueError(f"label id {hi} is above 65535; the corpus stores labels as uint8/uint16")
    dtype = np.uint8 if hi + extra_ids <= 255 else np.uint16
    return lab.astype(dtype, copy=True)


def _remove_small(sub: np.ndarray, lid: int, min_size: int, structure: np.ndarray) -> tuple[int, int]:
    """Set components of ``lid`` smaller than ``min_size`` in ``sub`` (a view) to 0; (count, voxels)."""
    m = sub == lid
    cc, n = ndimage.label(m, structure=structure)
    if n == 0:
        return 0, 0
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    small = np.flatnonzero(sizes < min_size)
    small = small[small > 0]
    if small.size == 0:
        return 0, 0
    sub[np.isin(cc, small)] = 0
    return int(small.size), int(sizes[small].sum())


def curate_labels(
    lab: np.ndarray,
    *,
    keep_labels: Sequence[int] | None = None,
    drop_labels: Sequence[int] = (),
    min_component_3d: int = 1000,
    min_component_2d: int = 100,
    instance_labels: Sequence[int] = (),
    names: dict[int, str] | None = None,
    slice_axis: int = 0,
) -> tuple[np.ndarray, dict[int, str], dict[str, Any]]:
    """MedSAM's label clean-up on a ``(Z, Y, X)`` volume (or one ``(H, W)`` image).

    Order: keep/drop ids; per label, remove 3D components (26-connectivity)
    below ``min_component_3d`` voxels (volumes only); per slice along
    ``slice_axis`` and per label, remove 2D components (8-connectivity) below
    ``min_component_2d`` pixels; split each id of ``instance_labels`` into its
    connected components, relabelled with new ids above every existing id and
    named ``<name>_<n>`` (n = 1, 2, ... in scan order).

    Returns ``(labels, names, stats)``: a new uint8/uint16 array, the names of
    the ids left in it, and what was removed.
    """
    names = dict(names or {})
    volume = lab.ndim == 3
    work = _as_label_array(lab, extra_ids=0 if not instance_labels else 256)
    stats: dict[str, Any] = {"dropped": {}, "removed_3d": {}, "removed_2d": {}, "instances": {}}

    counts = np.bincount(work.ravel())
    present = [int(i) for i in np.flatnonzero(counts) if i > 0]
    keep = None if keep_labels is None else set(int(i) for i in keep_labels)
    drop = set(int(i) for i in drop_labels)
    zero = [i for i in present if (keep is not None and i not in keep) or i in drop]
    if zero:
        work[np.isin(work, zero)] = 0
        stats["dropped"] = {str(i): int(counts[i]) for i in zero}

    if volume and min_component_3d > 1:
        struct3 = np.ones((3, 3, 3), dtype=bool)
        for lid, bb in enumerate(ndimage.find_objects(work), start=1):
            if bb is None:
                continue
            n, vox = _remove_small(work[bb], lid, min_component_3d, struct3)
            if n:
                stats["removed_3d"][str(lid)] = [n, vox]

    stack = np.moveaxis(work, slice_axis, 0) if volume else work[None]
    if min_component_2d > 1:
        struct2 = np.ones((3, 3), dtype=bool)
        removed2: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for s in np.flatnonzero(np.any(stack, axis=(1, 2))):
            sl = stack[s]
            for lid, bb in enumerate(ndimage.find_objects(sl), start=1):
                if bb is None:
                    continue
                n, vox = _remove_small(sl[bb], lid, min_component_2d, struct2)
                if n:
                    removed2[lid][0] += n
                    removed2[lid][1] += vox
        stats["removed_2d"] = {str(k): v for k, v in sorted(removed2.items())}

    if instance_labels:
        top = max([int(work.max())] + list(names))
        next_id = top + 1
        struct = np.ones((3,) * work.ndim, dtype=bool)
        for lid in sorted(set(int(i) for i in instance_labels)):
            m = work == lid
            if not m.any():
                continue
            cc, n = ndimage.label(m, structure=struct)
            if next_id + n - 1 > np.iinfo(np.uint16).max:
                raise ValueError(f"instance split of label {lid} needs ids above 65535")
            if next_id + n - 1 > np.iinfo(work.dtype).max:
                work = work.astype(np.uint16)
                m = work == lid
            work[m] = (cc[m] + (next_id - 1)).astype(work.dtype)
            base = names.pop(lid, f"label_{lid}")
            for k in range(1, n + 1):
                names[next_id + k - 1] = f"{base}_{k}"
            stats["instances"][str(lid)] = list(range(next_id, next_id + n))
            next_id += n

    final = np.bincount(work.ravel())
    left = [int(i) for i in np.flatnonzero(final) if i > 0]
    out_dtype = np.uint8 if (not left or max(left) <= 255) else np.uint16
    if work.dtype != out_dtype:
        work = work.astype(out_dtype)
    out_names = {i: names.get(i, f"label_{i}") for i in left}
    stats["voxels"] = {str(i): int(final[i]) for i in left}
    return work, out_names, stats


# --------------------------------------------------------------------------- intensities
class _Normalizer:
    """Per-slice intensity mapping equal to :func:`normalize_image` on the whole volume."""

    def __init__(self, image: MedicalImage, spec: DatasetSpec):
        self.color = image.is_color
        self.modality = spec.modality
        recipe = _RECIPES[spec.modality]
        arr = image.array
        if self.color:
            self.info = {"recipe": "color", "modality": spec.modality}
            self._color_out = normalize_image(arr, spec.modality, color=True)
            return
        if recipe == "window":
            level, width = spec.window_level_width()
            self.kind = "window"
            self.level, self.width = float(level), float(width)
            self.info = {
                "recipe": "ct_window",
                "window": spec.window if isinstance(spec.window, str) else None,
                "level": self.level,
                "width": self.width,
                "range_hu": [self.level - self.width / 2, self.level + self.width / 2],
            }
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise ValueError("image holds NaN or infinite values")
            return
        self.kind = "percentile"
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError("image holds NaN or infinite values")
        fg = arr[arr > 0].astype(np.float64)
        if fg.size == 0:
            self.lo = self.hi = None
        else:
            lo, hi = np.percentile(fg, _PERCENTILES)
            self.lo, self.hi = float(lo), float(hi)
        self.info = {
            "recipe": "percentile",
            "percentiles": list(_PERCENTILES),
            "of": "voxels > 0 of the whole volume; zeros stay 0",
            "lo": self.lo,
            "hi": self.hi,
        }

    def __call__(self, sl: np.ndarray) -> np.ndarray:
        if self.color:
            return self._color_out
        if self.kind == "window":
            return window_ct(sl, self.level, self.width)
        if self.lo is None:
            return np.zeros(sl.shape, dtype=np.uint8)
        f = sl.astype(np.float64)
        out = _scale_to_uint8(np.clip(f, self.lo, self.hi), self.lo, self.hi)
        out[f == 0] = 0
        return out


# --------------------------------------------------------------------------- one case
@dataclass(frozen=True)
class _CaseTask:
    spec: DatasetSpec
    case: str
    image: str
    label: str
    out_dir: str
    split: str
    case_list_digest: str
    n_cases_in_dataset: int


def _save_slice(path: Path, image: np.ndarray, label: np.ndarray, spacing: np.ndarray) -> None:
    np.savez_compressed(path, image=image, label=label, spacing=spacing)


def slice_objects(label: np.ndarray) -> list[list[int]]:
    """``[label, x0, y0, x1, y1, area]`` of every label id present in a 2D label map (inclusive
    bounding box, x = column), in id order: the objects of one corpus slice."""
    objs = []
    for lid, bb in enumerate(ndimage.find_objects(label), start=1):
        if bb is None:
            continue
        area = int(np.count_nonzero(label[bb] == lid))
        ys, xs = bb[0], bb[1]
        objs.append([lid, xs.start, ys.start, xs.stop - 1, ys.stop - 1, area])
    return objs


def write_case(
    out_dir: str | Path,
    dataset: str,
    case: str,
    slices: Iterable[tuple[int, np.ndarray, np.ndarray]],
    spacing: Sequence[float],
    record: dict[str, Any],
    started: float | None = None,
) -> dict[str, Any]:
    """Write one case of a corpus: ``cases/<dataset>/<case>/slices/<slice:04d>.npz`` and ``case.json``.

    ``slices`` yields ``(slice index, image (H, W[, 3]) uint8, label (H, W) uint8|uint16)``;
    every slice is stored with ``spacing`` (row, col, mm) and its objects
    (:func:`slice_objects`). ``record`` holds the case's own fields (``modality``, ``split``,
    ``label_names`` ...; :func:`build_index` reads ``modality``, ``split``, ``label_names`` and
    ``label_source``); format, status, dataset, case, the slice list and the counts are added
    here, and ``seconds`` when ``started`` (a ``time.perf_counter()`` value) is given. The folder
    is written under a hidden temporary name and renamed when complete (replacing an older one),
    so a case folder that exists is finished. Returns the written record. Used by
    :func:`prepare` and by the workbench's training job (accepted labels as a corpus).
    """
    out = Path(out_dir)
    ds_dir = out / "cases" / dataset
    ds_dir.mkdir(parents=True, exist_ok=True)
    tmp = ds_dir / f".{case}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    final = ds_dir / case
    spacing = np.asarray(spacing, dtype=np.float64)
    slices_rec = []
    n_objects = 0
    try:
        (tmp / "slices").mkdir(parents=True)
        for s, img2, lab2 in slices:
            img2 = np.ascontiguousarray(img2)
            lab2 = np.ascontiguousarray(lab2)
            objs = slice_objects(lab2)
            fname = f"slices/{int(s):04d}.npz"
            _save_slice(tmp / fname, img2, lab2, spacing)
            slices_rec.append(
                {"slice": int(s), "file": fname, "height": int(lab2.shape[0]), "width": int(lab2.shape[1]),
                 "objects": objs}
            )
            n_objects += len(objs)
        full = {
            "format": CASE_FORMAT,
            "version": CORPUS_VERSION,
            "status": "done",
            "dataset": dataset,
            "case": case,
            **record,
            "n_slices": len(slices_rec),
            "n_objects": n_objects,
            "slices": slices_rec,
            "created": _now(),
            "medsam_version": _medsam_version(),
        }
        if started is not None:
            full["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / "case.json").write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return full


def _curate_case(task: _CaseTask, stage: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = task.spec
    out = Path(task.out_dir)
    stage[0] = "read image"
    image = read_image(task.image)
    stage[0] = "read label"
    label = read_image(task.label)
    stage[0] = "geometry"
    if image.is_color and image.ndim_spatial != 2:
        raise ValueError("colour volumes are not supported")
    lab, alignment = align_label(image, label, spec.label_alignment)
    if spec.modality == "CT" and image.is_color:
        raise ValueError("a CT image cannot be a colour image")

    stage[0] = "labels"
    if spec.label_names == "header":
        names = nifti_label_names(task.label)
        names_from = "label file header"
    else:
        names = dict(spec.label_names)
        names_from = "spec"
    volume = image.is_volume
    axis = spec.slice_axis if volume else 0
    lab, out_names, stats = curate_labels(
        lab,
        keep_labels=spec.keep_labels,
        drop_labels=spec.drop_labels,
        min_component_3d=spec.min_component_3d,
        min_component_2d=spec.min_component_2d,
        instance_labels=spec.instance_labels,
        names=names,
        slice_axis=axis,
    )

    stage[0] = "normalise"
    norm = _Normalizer(image, spec)
    if volume:
        img_stack = np.moveaxis(image.array, axis, 0)
        lab_stack = np.moveaxis(lab, axis, 0)
        sp = list(image.spacing_zyx)
        del sp[axis]
    else:
        img_stack = image.array[None]
        lab_stack = lab[None]
        sp = list(image.spacing_zyx)
    spacing = np.asarray(sp, dtype=np.float64)
    kept = [int(s) for s in np.flatnonzero(np.any(lab_stack, axis=(1, 2)))]

    stage[0] = "write"
    record = write_case(
        out,
        spec.name,
        task.case,
        (
            (s, norm(img_stack[s]) if not image.is_color else norm(None), lab_stack[s])
            for s in kept
        ),
        spacing,
        {
            "modality": spec.modality,
            "label_source": spec.label_source,
            "source": {"image": str(task.image), "label": str(task.label)},
            "geometry": {
                "shape": list(image.spatial_shape),
                "is_color": image.is_color,
                "spacing_zyx": list(image.spacing_zyx),
                "spacing_xyz": list(image.spacing),
                "origin": list(image.origin),
                "direction": np.asarray(image.direction).tolist(),
                "source_format": image.source_format,
            },
            "label_alignment": alignment,
            "slice_axis": axis,
            "slice_spacing_rc": spacing.tolist(),
            "normalization": norm.info,
            "curation": {
                "keep_labels": None if spec.keep_labels is None else list(spec.keep_labels),
                "drop_labels": list(spec.drop_labels),
                "min_component_3d": spec.min_component_3d if volume else None,
                "min_component_2d": spec.min_component_2d,
                "instance_labels": list(spec.instance_labels),
                **{k: v for k, v in stats.items() if k != "voxels"},
            },
            "label_names": {str(k): v for k, v in out_names.items()},
            "label_names_from": names_from,
            "label_voxels": stats["voxels"],
            "label_dtype": str(lab.dtype),
            "split": task.split,
            "case_list_digest": task.case_list_digest,
            "n_cases_in_dataset": task.n_cases_in_dataset,
            "fingerprint": spec.processing_fingerprint(),
        },
        started=t0,
    )
    return {"n_slices": record["n_slices"], "n_objects": record["n_objects"], "seconds": record["seconds"]}


def _process_case(task: _CaseTask) -> dict[str, Any]:
    """Curate one case; never raises an ``Exception`` (reported in the result instead)."""
    stage = ["start"]
    try:
        res = _curate_case(task, stage)
        return {"ok": True, "dataset": task.spec.name, "case": task.case, "max_rss_mb": _max_rss_mb(), **res}
    except Exception as exc:  # noqa: BLE001 - a broken case must not stop the run
        msg = " ".join(str(exc).split()) or type(exc).__name__
        return {
            "ok": False,
            "dataset": task.spec.name,
            "case": task.case,
            "stage": stage[0],
            "error": f"{type(exc).__name__}: {msg}"[:1000],
        }


def _max_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (0 where unknown)."""
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)
    except Exception:  # noqa: BLE001 - e.g. Windows
        return 0.0


def _worker_init(threads: int, main_pid: int) -> None:
    """Set up a curation worker: it ends with the process that started it (even one killed with
    SIGKILL), leaves Ctrl-C to the parent (which stops the pool), and unwinds on SIGTERM so that
    temporary files are removed."""
    import signal

    from ..lifecycle import die_with_parent, install_termination_handler

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_termination_handler()
    die_with_parent(main_pid)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- index
def _load_case_records(out: Path) -> list[dict]:
    recs = []
    root = out / "cases"
    if not root.is_dir():
        return recs
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for case_dir in sorted(p for p in ds_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rec = _read_json(case_dir / "case.json")
            if rec and rec.get("status") == "done" and rec.get("format") == CASE_FORMAT:
                recs.append(rec)
    return recs


def _load_errors(out: Path) -> list[CaseError]:
    errs = []
    root = out / "errors"
    if not root.is_dir():
        return errs
    for f in sorted(root.glob("*/*.json")):
        rec = _read_json(f)
        if rec:
            errs.append(CaseError(**{k: str(rec.get(k, "")) for k in ERROR_COLUMNS}))
    return errs


def build_index(
    out_dir: str | Path,
    splits: dict[str, dict[str, str]] | None = None,
    datasets: Sequence[dict] | None = None,
) -> dict[str, Any]:
    """(Re)build ``manifest.csv``, ``summary.csv`` and ``errors.csv`` from every finished case.

    ``splits`` (``{dataset: {case: split}}``) overrides the split recorded in
    ``case.json`` (and the record is updated); ``datasets`` are spec dicts,
    used for each dataset's ``label_source``. Returns the counts.
    """
    out = Path(out_dir)
    splits = splits or {}
    src_of = {d["name"]: d.get("label_source", "") for d in (datasets or [])}
    rows = []
    agg: dict[tuple, dict[str, Any]] = {}
    ds_tot: dict[tuple, dict[str, Any]] = {}
    split_counts = {s: 0 for s in SPLITS}
    digests: dict[str, set] = defaultdict(set)
    recs = _load_case_records(out)
    for rec in recs:
        ds, case = rec["dataset"], rec["case"]
        split = splits.get(ds, {}).get(case, rec.get("split", "train"))
        if split != rec.get("split"):
            rec["split"] = split
            _write_json_atomic(_case_dir(out, ds, case) / "case.json", rec)
        digests[ds].add(rec.get("case_list_digest"))
        split_counts[split] = split_counts.get(split, 0) + 1
        modality = rec["modality"]
        names = rec.get("label_names", {})
        source = src_of.get(ds) or rec.get("label_source", "")
        tot = ds_tot.setdefault((ds, modality), {"source": source, "cases": set(), "slices": 0, "objects": 0,
                                                 "voxels": 0, "split_cases": defaultdict(set)})
        tot["cases"].add(case)
        tot["split_cases"][split].add(case)
        for sl in rec["slices"]:
            tot["slices"] += 1
            path = f"cases/{ds}/{case}/{sl['file']}"
            for lid, x0, y0, x1, y1, area in sl["objects"]:
                name = names.get(str(lid), f"label_{lid}")
                rows.append((ds, case, sl["slice"], lid, name, modality, x0, y0, x1, y1, area, split, path,
                             sl["height"], sl["width"]))
                a = agg.setdefault((ds, modality, lid, name), {"source": source, "cases": set(), "slices": set(),
                                                                "objects": 0, "voxels": 0,
                                                                "split_cases": defaultdict(set)})
                a["cases"].add(case)
                a["slices"].add((case, sl["slice"]))
                a["objects"] += 1
                a["voxels"] += area
                a["split_cases"][split].add(case)
                tot["objects"] += 1
                tot["voxels"] += area
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    _write_csv_atomic(out / "manifest.csv", MANIFEST_COLUMNS, rows)

    summary = []
    for (ds, modality), t in sorted(ds_tot.items()):
        summary.append((ds, modality, "", "(all labels)", t["source"], len(t["cases"]), t["slices"], t["objects"],
                        t["voxels"], *(len(t["split_cases"][s]) for s in SPLITS)))
        for (ds2, mod2, lid, name), a in sorted(agg.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
            if (ds2, mod2) != (ds, modality):
                continue
            summary.append((ds, modality, lid, name, a["source"], len(a["cases"]), len(a["slices"]), a["objects"],
                            a["voxels"], *(len(a["split_cases"][s]) for s in SPLITS)))
    _write_csv_atomic(out / "summary.csv", SUMMARY_COLUMNS, summary)

    done = {(r["dataset"], r["case"]) for r in recs}
    errors = []
    for e in _load_errors(out):
        if e.stage != "match" and (e.dataset, e.case) in done:  # failed once, finished since (e.g. merged)
            _error_file(out, e.dataset, e.case).unlink(missing_ok=True)
        else:
            errors.append(e)
    _write_csv_atomic(out / "errors.csv", ERROR_COLUMNS, [[getattr(e, c) for c in ERROR_COLUMNS] for e in errors])
    warnings = [
        f"dataset {ds!r}: its finished cases were split from {len(d)} different case lists "
        "(shards saw different sources?); rerun prepare with the full source list"
        for ds, d in sorted(digests.items())
        if len(d) > 1
    ]
    return {
        "cases": len(recs),
        "slices": sum(t["slices"] for t in ds_tot.values()),
        "objects": len(rows),
        "splits": split_counts,
        "errors": errors,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- corpus.json
def _update_corpus_json(out: Path, specs: Sequence[DatasetSpec | dict], counts: dict | None = None) -> list[dict]:
    path = out / "corpus.json"
    old = _read_json(path) or {}
    if old and old.get("format") != CORPUS_FORMAT:
        raise ValueError(f"{path} is not a {CORPUS_FORMAT} file")
    datasets = {d["name"]: d for d in old.get("datasets", []) if isinstance(d, dict) and "name" in d}
    for s in specs:
        d = dict(s) if isinstance(s, dict) else s.to_dict()
        datasets[d["name"]] = d
    data = {
        "format": CORPUS_FORMAT,
        "version": CORPUS_VERSION,
        "datasets": [datasets[k] for k in sorted(datasets)],
        "created": old.get("created") or _now(),
        "updated": _now(),
        "medsam_version": _medsam_version(),
        "label_sources": {k: datasets[k].get("label_source", "") for k in sorted(datasets)},
    }
    if counts is not None:
        data["counts"] = {k: counts[k] for k in ("cases", "slices", "objects", "splits")}
    elif "counts" in old:
        data["counts"] = old["counts"]
    _write_json_atomic(path, data)
    return data["datasets"]


def index_corpus(out_dir: str | Path, datasets: Sequence[DatasetSpec | dict] = ()) -> dict[str, Any]:
    """Finish a corpus whose cases were written with :func:`write_case`: (re)build
    ``manifest.csv``, ``summary.csv`` and ``errors.csv`` (:func:`build_index`, splits as
    recorded in each ``case.json``) and ``corpus.json`` (``datasets``: specs, or dicts with at
    least a ``name``, recorded as given). Returns the counts of :func:`build_index`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = _update_corpus_json(out, datasets)
    counts = build_index(out, None, recorded)
    _update_corpus_json(out, datasets, counts)
    return counts


# --------------------------------------------------------------------------- main entry
def _coerce_specs(specs) -> list[DatasetSpec]:
    if specs is None:
        return []
    if isinstance(specs, (str, Path, DatasetSpec)):
        specs = [specs]
    out: list[DatasetSpec] = []
    for s in specs:
        if isinstance(s, DatasetSpec):
            out.append(s)
        elif isinstance(s, dict):
            out.append(DatasetSpec.from_dict(s))
        else:
            out.extend(load_specs(s))
    check_unique_names(out)
    return out


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output exists and is not a folder")
    if out.is_dir():
        entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if entries and not ({"corpus.json", "cases"} & set(entries)):
            raise ValueError(
                f"{out}: folder is not empty and holds no medsam corpus (no corpus.json or cases/); "
                "choose an empty or new folder"
            )


def _check_shard(shard) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (i, n), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard (i, n) needs n >= 1 and 0 <= i < n, got ({i}, {n})")
    return (i, n)


def _is_done(out: Path, spec: DatasetSpec, case: str) -> dict | None:
    rec = _read_json(_case_dir(out, spec.name, case) / "case.json")
    if (
        rec
        and rec.get("status") == "done"
        and rec.get("format") == CASE_FORMAT
        and rec.get("fingerprint") == spec.processing_fingerprint()
    ):
        return rec
    return None


def prepare(
    specs: Sequence[DatasetSpec | str | Path] | DatasetSpec | str | Path | None,
    out_dir: str | Path,
    workers: int = 2,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    merge_only: bool = False,
) -> PrepareReport:
    """Curate the datasets of ``specs`` into the corpus folder ``out_dir``.

    Parameters
    ----------
    specs:
        :class:`DatasetSpec` objects and/or paths of YAML spec files. May be
        empty with ``merge_only``.
    workers:
        Processes curating cases in parallel (``<= 1``: in this process).
    shard:
        ``(i, n)``: curate only the cases whose index in the sorted list of
        all ``(dataset, case)`` pairs is ``i`` modulo ``n``.
    progress:
        Show a tqdm progress bar.
    merge_only:
        Curate nothing; rebuild ``manifest.csv``, ``summary.csv``,
        ``errors.csv`` and ``corpus.json`` from the cases in ``out_dir``.

    A rerun skips cases whose ``case.json`` says done (and was made with the
    same processing settings); a case that cannot be read, whose label does
    not match its geometry, or that is 4D is reported (report, ``errors.csv``)
    and skipped. Raises ``SpecError``/``ValueError`` for bad specs or options.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    spec_list = _coerce_specs(specs)
    shard = _check_shard(shard)
    if not merge_only and not spec_list:
        raise ValueError("no dataset spec given")
    try:
        workers = int(workers)
    except (TypeError, ValueError):
        raise ValueError(f"workers must be an integer, got {workers!r}") from None
    _check_out_dir(out)
    report = PrepareReport(out_dir=out, datasets=[s.name for s in spec_list], shard=shard, merge_only=merge_only)

    split_maps: dict[str, dict[str, str]] = {}
    tasks: list[_CaseTask] = []
    match_errors: list[CaseError] = []
    if not merge_only:
        for spec in spec_list:
            cases, problems = spec.find_cases()
            ids = [c.case for c in cases]
            try:
                split_maps[spec.name] = assign_splits(ids, spec.split, spec.seed, spec.split_overrides)
            except SpecError as exc:
                raise SpecError(f"{spec.spec_file or 'spec'}: dataset {spec.name!r}: {exc}") from None
            digest = case_list_digest(ids)
            for cid, msg, path in problems:
                image_side = msg.startswith("no label")  # an image without its label
                match_errors.append(
                    CaseError(spec.name, cid, "match", msg, path if image_side else "", "" if image_side else path)
                )
            for c in cases:
                tasks.append(
                    _CaseTask(spec, c.case, str(c.image), str(c.label), str(out), split_maps[spec.name][c.case],
                              digest, len(ids))
                )
        tasks.sort(key=lambda t: (t.spec.name, t.case))
        if shard is not None:
            tasks = [t for k, t in enumerate(tasks) if k % shard[1] == shard[0]]

    out.mkdir(parents=True, exist_ok=True)
    datasets = _update_corpus_json(out, spec_list)

    if not merge_only:
        if shard is None:  # leftovers of killed runs (a sharded run may share OUT with others)
            for spec in spec_list:
                ds_dir = out / "cases" / spec.name
                if ds_dir.is_dir():
                    for p in ds_dir.glob(".*.tmp-*"):
                        shutil.rmtree(p, ignore_errors=True)
        # unmatched files: rewrite this run's 'match' records
        for spec in spec_list:
            err_dir = out / "errors" / spec.name
            if err_dir.is_dir():
                for f in err_dir.glob("*.json"):
                    rec = _read_json(f)
                    if rec and rec.get("stage") == "match":
                        f.unlink(missing_ok=True)
        for e in match_errors:
            _write_json_atomic(_error_file(out, e.dataset, e.case), e.__dict__)
        report.errors.extend(match_errors)

        report.n_cases = len(tasks)
        todo = []
        for t in tasks:
            if _is_done(out, t.spec, t.case) is not None:
                report.n_skipped += 1
                _error_file(out, t.spec.name, t.case).unlink(missing_ok=True)
            else:
                todo.append(t)
        _run_tasks(todo, out, workers, progress, report)
        report.n_failed = sum(1 for e in report.errors if e.stage != "match")

    counts = build_index(out, split_maps, datasets)
    _update_corpus_json(out, spec_list, counts)
    report.corpus_cases = counts["cases"]
    report.corpus_slices = counts["slices"]
    report.corpus_objects = counts["objects"]
    report.splits = counts["splits"]
    report.warnings.extend(counts["warnings"])
    if merge_only:
        report.errors = counts["errors"]
        report.n_failed = sum(1 for e in report.errors if e.stage != "match")
    report.seconds = time.perf_counter() - t0
    return report


def _record_result(res: dict, task: _CaseTask, out: Path, report: PrepareReport) -> None:
    report.peak_rss_mb = max(report.peak_rss_mb, float(res.get("max_rss_mb") or 0.0))
    if res.get("ok"):
        report.n_processed += 1
        report.processed.append((task.spec.name, task.case))
        _error_file(out, task.spec.name, task.case).unlink(missing_ok=True)
    else:
        err = CaseError(task.spec.name, task.case, res.get("stage", "?"), res.get("error", "?"), task.image, task.label)
        report.errors.append(err)
        _write_json_atomic(_error_file(out, err.dataset, err.case), err.__dict__)


def _run_tasks(todo: list[_CaseTask], out: Path, workers: int, progress: bool, report: PrepareReport) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="case", desc="prepare", disable=not progress or not todo)
    try:
        if workers <= 1 or len(todo) <= 1:
            for t in todo:
                bar.set_postfix_str(f"{t.spec.name}/{t.case}", refresh=False)
                _record_result(_process_case(t), t, out, report)
                bar.update(1)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        n = min(workers, len(todo))
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        threads = max(1, (os.cpu_count() or 1) // n)
        ex = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init, initargs=(threads, os.getpid()))
        try:
            futs = {ex.submit(_process_case, t): t for t in todo}
            for fut in as_completed(futs):
                t = futs[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool as exc:
                    res = {"ok": False, "stage": "worker", "error": f"worker process died ({exc}); rerun to resume"}
                except Exception as exc:  # noqa: BLE001
                    res = {"ok": False, "stage": "worker", "error": f"{type(exc).__name__}: {exc}"}
                _record_result(res, t, out, report)
                bar.update(1)
        except BaseException:  # Ctrl-C, SIGTERM (medsam.lifecycle.Terminated), errors: stop now
            from ..lifecycle import stop_process_pool

            stop_process_pool(ex)
            raise
        ex.shutdown(wait=True)
    finally:
        bar.close()
