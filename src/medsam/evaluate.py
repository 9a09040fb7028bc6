"""Evaluate segmentations against ground truth: per-case, per-label DSC, NSD and HD95.

:func:`evaluate` takes a prediction and a ground truth, each a file or a folder.
Folders are matched by file name (``pred/case.nii.gz`` with ``gt/case.nii.gz``);
only the files directly inside the folders, with a supported extension, are used.

Supported files and their axis conventions
------------------------------------------
* Medical images (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``),
  read with SimpleITK: the array is ``(z, y, x)`` (``GetArrayFromImage``) and
  ``GetSpacing()`` is ``(x, y, z)``; it is **reversed** to array order
  ``(z, y, x)`` before scoring. (Using it unreversed is a known bug of the MedSAM
  release.)
* CVPR 2024 "MedSAM on Laptop" ``.npz`` files: the prediction under key ``segs``,
  the ground truth under key ``gts`` (``(D, H, W)`` for 3D, ``(H, W)`` for 2D), and
  an optional ``spacing``. That ``spacing`` was written by the MedSAM
  preprocessing as ``img_sitk.GetSpacing()``, i.e. ``(x, y, z)``; it is reversed to
  array order (for a 2D ``(H, W)`` array with a 3-entry spacing, ``(y, x)`` is
  used). Without ``spacing``, 1 mm per axis.
* ``.png`` label images, read with Pillow, spacing 1 per axis. An image whose only
  values are 0 and 255 is read as a binary mask (255 -> label 1), the usual way
  8-bit mask images are saved. RGB(A) images are accepted only if grey (R = G = B).

Labels are the union of the non-zero labels in the prediction and the ground truth
(see :func:`medsam.metrics.label_scores`); the metric conventions (empty masks,
NSD always computed, never NaN) are those of :mod:`medsam.metrics`.

Errors are rows, not exceptions: a pair whose shapes differ, whose spacings differ
by more than 1e-3 mm on any axis (when both files store a spacing), that cannot be
read, a ground-truth case without a prediction, a prediction without a ground
truth, or a case with no foreground label at all gives one row with an ``error``
message and empty metrics, and the other cases are scored. Error rows do not enter
the means of the summary; they are counted in its ``n_errors``.

Outputs (written atomically: a temporary file in the same folder, then
``os.replace``):

* ``out_csv``: one row per case and label, columns :data:`CSV_COLUMNS`. Floats
  are written with full precision (``repr``), HD95 may be ``inf``.
* ``summary_csv`` (optional): :data:`SUMMARY_COLUMNS`, see :func:`summarize`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io.atomic import write_csv
from .metrics import label_scores

__all__ = ["CSV_COLUMNS", "SUMMARY_COLUMNS", "EvaluationResult", "evaluate", "summarize"]

CSV_COLUMNS = (
    "dataset",
    "modality",
    "case",
    "label",
    "dsc",
    "nsd",
    "hd95",
    "gt_voxels",
    "pred_voxels",
    "error",
)
SUMMARY_COLUMNS = (
    "dataset",
    "modality",
    "label",
    "n",
    "dsc_mean",
    "dsc_std",
    "nsd_mean",
    "nsd_std",
    "n_errors",
)

MEDICAL_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_EXTENSIONS = MEDICAL_EXTENSIONS + (".npz", ".png")

SPACING_ATOL_MM = 1e-3
ALL = "all"


@dataclass
class EvaluationResult:
    """What :func:`evaluate` computed and wrote.

    Attributes:
        rows: one dict per case and label (keys :data:`CSV_COLUMNS`); metric values
            are floats / ints, or ``None`` on error rows; ``error`` is ``""`` when
            the row was scored.
        summary: the rows of :func:`summarize` (keys :data:`SUMMARY_COLUMNS`).
        out_csv: where ``rows`` were written.
        summary_csv: where ``summary`` was written, or ``None``.
    """

    rows: list[dict]
    summary: list[dict]
    out_csv: Path
    summary_csv: Path | None = None

    @property
    def errors(self) -> list[dict]:
        """The error rows."""
        return [r for r in self.rows if r["error"]]


# --------------------------------------------------------------------------- reading


def _extension(name: str) -> str | None:
    low = name.lower()
    for ext in SUPPORTED_EXTENSIONS:  # ".nii.gz" is tried before ".nii"
        if low.endswith(ext):
            return ext
    return None


def _case_name(name: str) -> str:
    ext = _extension(name)
    return name[: -len(ext)] if ext else name


def _read_medical(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path.name}: {img.GetNumberOfComponentsPerPixel()} components per voxel, expected 1")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))  # (x, y, z) -> (z, y, x)
    return arr, spacing


def _npz_spacing(raw, arr: np.ndarray, name: str) -> tuple[float, ...]:
    """CVPR 2024 npz spacing, stored as SimpleITK ``(x, y, z)``, in array order."""
    sp = [float(s) for s in np.asarray(raw, dtype=float).reshape(-1)][::-1]
    if len(sp) == arr.ndim:
        return tuple(sp)
    if arr.ndim == 2 and len(sp) == 3:  # a 2D slice with its volume's spacing: keep (y, x)
        return tuple(sp[1:])
    raise ValueError(f"{name}: spacing {list(np.asarray(raw).reshape(-1))} does not fit an array of shape {arr.shape}")


def _read_npz(path: Path, key: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    with np.load(path, allow_pickle=False) as z:
        if key not in z.files:
            raise ValueError(f"{path.name}: no '{key}' array (keys: {', '.join(z.files)})")
        arr = z[key]
        spacing = _npz_spacing(z["spacing"], arr, path.name) if "spacing" in z.files else None
    return arr, spacing


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        arr = np.asarray(im)
    if arr.ndim == 3:
        color = arr[..., :3] if mode in ("RGB", "RGBA", "RGBX") else arr[..., :1]
        if not (color == color[..., :1]).all():
            raise ValueError(f"{path.name}: a colour {mode} image, expected a single-channel label image")
        arr = color[..., 0]
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    values = np.unique(arr)
    if values.size and np.isin(values, (0, 255)).all():
        arr = (arr == 255).astype(np.uint8)
    return arr


def _read(path: Path, role: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Read a label map; returns ``(array, spacing in array order or None if not stored)``."""
    ext = _extension(path.name)
    if ext in MEDICAL_EXTENSIONS:
        return _read_medical(path)
    if ext == ".npz":
        return _read_npz(path, "segs" if role == "pred" else "gts")
    if ext == ".png":
        return _read_png(path), None
    raise ValueError(f"{path.name}: unsupported file type (supported: {', '.join(SUPPORTED_EXTENSIONS)})")


def _list_cases(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and _extension(p.name) is not None
    }


# --------------------------------------------------------------------------- scoring


def _row(dataset: str, modality: str, case: str, error: str = "", **metrics) -> dict:
    row = dict.fromkeys(CSV_COLUMNS)
    row.update(dataset=dataset, modality=modality, case=case, label="", error=error)
    row.update(metrics)
    return row


def _fmt(spacing: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:.6g}" for s in spacing) + ")"


def _relabel(pred: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """``pred`` with each id ``k`` of ``label_map`` replaced by ``label_map[k]`` (others kept)."""
    out = pred.copy()
    for src, dst in label_map.items():
        out[pred == src] = dst
    return out


def _foreground_ids(labels: np.ndarray) -> set:
    return set(np.unique(labels).tolist()) - {0}


def _disjoint_labels(p: set, g: set) -> str | None:
    """The error text when both label sets are non-empty and share nothing (a label-id mix-up),
    else None."""
    if not p or not g or p & g:
        return None
    return (
        f"label ids share nothing: prediction {sorted(p)[:10]}, ground truth {sorted(g)[:10]}; "
        "map them with --label-map PRED=GT (label_map={pred: gt})"
    )


def _score_pair(
    pred_path: Path,
    gt_path: Path,
    case: str,
    dataset: str,
    modality: str,
    tol: float,
    label_map: dict[int, int] | None = None,
) -> list[dict]:
    try:
        gt, gt_sp = _read(gt_path, "gt")
        pred, pred_sp = _read(pred_path, "pred")
        if label_map:
            pred = _relabel(pred, label_map)
        pred_ids, gt_ids = _foreground_ids(pred), _foreground_ids(gt)
        disjoint = _disjoint_labels(pred_ids, gt_ids)
        if disjoint:
            return [_row(dataset, modality, case, disjoint)]
        if pred.shape != gt.shape:
            msg = f"shape mismatch: prediction {pred.shape} vs ground truth {gt.shape}"
            return [_row(dataset, modality, case, msg)]
        both = gt_sp is not None and pred_sp is not None
        if both and (len(gt_sp) != len(pred_sp) or not np.allclose(pred_sp, gt_sp, rtol=0, atol=SPACING_ATOL_MM)):
            message = (
                f"spacing mismatch: prediction {_fmt(pred_sp)} vs ground truth {_fmt(gt_sp)} mm (array axis order)"
            )
            return [_row(dataset, modality, case, message)]
        spacing = gt_sp if gt_sp is not None else pred_sp if pred_sp is not None else (1.0,) * gt.ndim
        scores = label_scores(pred, gt, spacing, tolerance_mm=tol, labels=sorted(pred_ids | gt_ids))
    except Exception as e:  # one bad case must not stop the evaluation
        return [_row(dataset, modality, case, f"{type(e).__name__}: {e}")]
    if not scores:
        return [
            _row(
                dataset, modality, case, "no foreground label in prediction or ground truth", gt_voxels=0, pred_voxels=0
            )
        ]
    return [_row(dataset, modality, case, **s) for s in scores]


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and population standard deviation (:func:`medsam.scoring.describe`), None when empty."""
    if not values:
        return None, None
    from .scoring import describe

    mean, std, _ = describe(values)
    return mean, std


def _label_key(label):
    return (0, int(label), "") if isinstance(label, (int, np.integer)) else (1, 0, str(label))


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Mean and standard deviation of DSC and NSD over scored rows.

    Rows (from one or several :func:`evaluate` calls) are grouped by
    ``(dataset, modality, label)``; then each ``(dataset, modality)`` gets a row with
    ``label = "all"`` pooling all its scored case-label rows; finally one overall row
    ``("all", "all", "all")`` pools every scored row. ``n`` is the number of scored
    rows; ``std`` is the population standard deviation (numpy's ``ddof=0``); error
    rows are excluded from the means and counted in ``n_errors`` (given on the
    ``"all"`` rows, ``None`` on per-label rows). Means of an empty group are ``None``.
    """
    rows = list(rows)
    by_label: dict[tuple, list[dict]] = defaultdict(list)
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    errors: dict[tuple, int] = defaultdict(int)
    for r in rows:
        group = (r["dataset"] or "", r["modality"] or "")
        by_group.setdefault(group, [])
        if r["error"]:
            errors[group] += 1
            continue
        by_label[group + (r["label"],)].append(r)
        by_group[group].append(r)

    def stats(dataset, modality, label, members, n_errors):
        dsc_mean, dsc_std = _mean_std([m["dsc"] for m in members])
        nsd_mean, nsd_std = _mean_std([m["nsd"] for m in members])
        return dict(
            dataset=dataset,
            modality=modality,
            label=label,
            n=len(members),
            dsc_mean=dsc_mean,
            dsc_std=dsc_std,
            nsd_mean=nsd_mean,
            nsd_std=nsd_std,
            n_errors=n_errors,
        )

    out = []
    for group in sorted(by_group):
        labels = sorted((k[2] for k in by_label if k[:2] == group), key=_label_key)
        out.extend(stats(*group, lab, by_label[group + (lab,)], None) for lab in labels)
        out.append(stats(*group, ALL, by_group[group], errors[group]))
    out.append(stats(ALL, ALL, ALL, [r for g in by_group.values() for r in g], sum(errors.values())))
    return out


# --------------------------------------------------------------------------- writing


# --------------------------------------------------------------------------- entry point


def evaluate(
    pred: str | os.PathLike,
    gt: str | os.PathLike,
    out_csv: str | os.PathLike,
    tolerance_mm: float = 2.0,
    summary_csv: str | os.PathLike | None = None,
    dataset: str | None = None,
    modality: str | None = None,
    label_map: dict[int, int] | None = None,
    require_scored: bool = False,
) -> EvaluationResult:
    """Score predictions against ground truth and write per-case and summary CSVs.

    Args:
        pred: a prediction file, or a folder of them.
        gt: a ground-truth file, or a folder of them (a folder if and only if
            ``pred`` is one). Folders are matched by file name; every ground-truth
            file gives rows (an error row if its prediction is missing), and so does
            every prediction without a ground truth (an error row).
        out_csv: the per-case, per-label CSV to write (columns :data:`CSV_COLUMNS`;
            ``case`` is the ground-truth file name without its extension).
        tolerance_mm: NSD tolerance in mm.
        summary_csv: if given, where to write :func:`summarize` of the rows.
        dataset, modality: written in every row (``""`` if ``None``).
        label_map: prediction label id -> ground-truth label id, applied before scoring (ids
            not named stay). Without it, a case whose prediction and ground truth both have
            labels but share no id is an error row (a mix-up of label ids, not a DSC of 0).
        require_scored: raise ValueError, writing nothing, when no case could be scored
            (the command line's behaviour); by default such a run writes its error rows.

    Returns:
        An :class:`EvaluationResult` with the rows and the summary.

    Raises:
        FileNotFoundError: ``pred`` or ``gt`` does not exist.
        ValueError: one is a file and the other a folder, a ground-truth folder
            with no supported file, a bad tolerance, ``summary_csv`` equal to
            ``out_csv``, or (with ``require_scored``) no case could be scored at all.
            Problems with single cases are error rows instead.
    """
    pred, gt, out_csv = Path(pred), Path(gt), Path(out_csv)
    summary_path = Path(summary_csv) if summary_csv is not None else None
    for p, what in ((pred, "prediction"), (gt, "ground truth")):
        if not p.exists():
            raise FileNotFoundError(f"{what} path does not exist: {p}")
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm!r}")
    if summary_path is not None and summary_path.resolve() == out_csv.resolve():
        raise ValueError("summary_csv and out_csv must be different files")
    dataset, modality = dataset or "", modality or ""

    rows: list[dict] = []
    if pred.is_dir() != gt.is_dir():
        raise ValueError(f"pred and gt must both be files or both be folders: {pred} vs {gt}")
    if gt.is_dir():
        gt_files, pred_files = _list_cases(gt), _list_cases(pred)
        if not gt_files:
            raise ValueError(f"no ground-truth file with a supported extension {SUPPORTED_EXTENSIONS} in {gt}")
        for name, gt_path in gt_files.items():
            case = _case_name(name)
            if name not in pred_files:
                rows.append(_row(dataset, modality, case, f"missing prediction: no {name} in {pred}"))
            else:
                rows.extend(_score_pair(pred_files[name], gt_path, case, dataset, modality, tol, label_map))
        for name in pred_files:
            if name not in gt_files:
                rows.append(_row(dataset, modality, _case_name(name), f"prediction has no ground truth {name} in {gt}"))
    else:
        rows.extend(_score_pair(pred, gt, _case_name(gt.name), dataset, modality, tol, label_map))

    if require_scored and all(r["error"] for r in rows):
        first = rows[0]
        more = f" (and {len(rows) - 1} more cases)" if len(rows) > 1 else ""
        raise ValueError(f"no case could be scored: {first['case']}: {first['error']}{more}")
    summary = summarize(rows)
    write_csv(out_csv, CSV_COLUMNS, rows)
    if summary_path is not None:
        write_csv(summary_path, SUMMARY_COLUMNS, summary)
    return EvaluationResult(rows=rows, summary=summary, out_csv=out_csv, summary_csv=summary_path)
