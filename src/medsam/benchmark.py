"""``medsam benchmark``: score a model (or a baseline) on a split of a prepared corpus.

    from medsam.benchmark import run_benchmark
    result = run_benchmark("demo-corpus", "bench/default", split="test")        # embedded model
    run_benchmark("demo-corpus", "bench/lite", checkpoint="lite_medsam.pth")
    run_benchmark("demo-corpus", "bench/otsu", baseline="otsu")

The corpus is the format of ``medsam prepare`` (:mod:`medsam.corpus`). The protocol (prompts from
the manifest's boxes, optionally jittered and seeded per object; one embedding per slice and all
its objects in one batched call after one untimed warm-up; DSC and NSD per object; error rows for
objects that cannot be scored; the statistics) is the evaluation engine's,
:mod:`medsam.scoring`, which the specialist and the workbench's training job use too. Baselines,
scored by the same loop (their "embedding" time is 0): ``box`` fills the prompt box; ``otsu``
thresholds the box's pixels with :func:`skimage.filters.threshold_otsu` (grey = mean of colour
channels), takes the side (bright ``> t`` or dark ``<= t``) that holds the majority of the pixels
in the box's central third (bright on a tie), and keeps that side's 8-connected component with
the most pixels in the central third (a constant box is filled). Time per slice: ``embed_s``
(preprocessing + encoder) and ``decode_s`` (prompt encoding, decoder, upsampling and thresholding
of all the slice's objects); memory: the process's peak resident set size after the slice and,
on CUDA, the peak allocated by torch during the slice.

Outputs in ``out_dir``: ``objects.csv`` (one row per object), ``slices.csv`` (one row per slice:
latency and memory), ``errors.csv``, ``summary.csv`` / ``summary.md`` (means per modality,
dataset, case, structure group and structure), ``run.json`` (settings, versions, totals) and
``dsc_by_structure.png`` (matplotlib when installed, else a plain Pillow chart).

Structure groups merge the sides and numbered members of a structure: the label name without
tokens ``left``/``right``/``L``/``R`` and tokens that are a number, optionally after one capital
letter (``rib_left_10`` -> ``rib``, ``vertebrae_T12`` -> ``vertebrae``,
``Frontal_Sup_L`` -> ``Frontal_Sup``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .io.atomic import write_csv, write_text
from .scoring import (  # the engine's columns and helpers, re-exported
    ERROR_COLUMNS,
    OBJECT_COLUMNS,
    SLICE_COLUMNS,
    SUMMARY_COLUMNS,
    PredictorMethod,
    ScoringReport,
    jitter_box,
    peak_rss_mb,
    score_objects,
    select_objects,
    structure_group,
    summarize,
)

if TYPE_CHECKING:
    from .zoom import ZoomPolicy

__all__ = [
    "BASELINES",
    "BenchmarkResult",
    "box_baseline",
    "compare_runs",
    "jitter_box",
    "otsu_baseline",
    "paired_differences",
    "run_benchmark",
    "structure_group",
    "summarize",
]

BASELINES = ("box", "otsu")


def _box_slices(box: Sequence[float], size: tuple[int, int]) -> tuple[slice, slice]:
    H, W = size
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(W - 1, x1), min(H - 1, y1)
    return slice(y0, y1 + 1), slice(x0, x1 + 1)


def box_baseline(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """(H, W) bool mask filling the inclusive box (corners rounded to pixels)."""
    H, W = image.shape[:2]
    mask = np.zeros((H, W), dtype=bool)
    mask[_box_slices(box, (H, W))] = True
    return mask


def otsu_baseline(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """(H, W) bool mask: Otsu's threshold inside the box, the side and component at its centre.

    The rule (module docstring): threshold the box's pixels with Otsu; the object's side (bright
    ``> t`` or dark ``<= t``) is the one holding the majority of the central third of the box
    (bright on a tie); keep that side's 8-connected component with the most central pixels
    (if no component touches the centre, the largest one). A constant box is filled.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    H, W = image.shape[:2]
    grey = image.astype(np.float64)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    rows, cols = _box_slices(box, (H, W))
    patch = grey[rows, cols]
    mask = np.zeros((H, W), dtype=bool)
    if patch.size == 0 or float(patch.min()) == float(patch.max()):
        mask[rows, cols] = True
        return mask
    t = threshold_otsu(patch)
    bright = patch > t
    h, w = patch.shape
    cr = slice(h // 3, max(h // 3 + 1, h - h // 3))
    cc = slice(w // 3, max(w // 3 + 1, w - w // 3))
    side = bright if bright[cr, cc].mean() >= 0.5 else ~bright
    components, n = ndimage.label(side, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        central = np.bincount(components[cr, cc].ravel(), minlength=n + 1)
        central[0] = 0
        if central.max() > 0:
            side = components == int(central.argmax())
        else:
            sizes = np.bincount(components.ravel(), minlength=n + 1)
            sizes[0] = 0
            side = components == int(sizes.argmax())
    mask[rows, cols] = side
    return mask


# --------------------------------------------------------------------------- methods
class BaselineMethod:
    """A baseline as a :class:`medsam.scoring.SliceMethod`: no embedding, one mask per box."""

    prompted = True
    warm_up = False

    def __init__(self, kind: str) -> None:
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
        self.fn = box_baseline if kind == "box" else otsu_baseline

    def embed(self, image: np.ndarray, spacing=(1.0, 1.0), rows=()) -> float:
        return 0.0

    def segment(self, image: np.ndarray, boxes: np.ndarray, rows=()) -> tuple[np.ndarray, np.ndarray, float]:
        start = time.perf_counter()
        masks = np.stack([self.fn(image, b) for b in boxes])
        seconds = time.perf_counter() - start
        return masks, np.full(len(boxes), np.nan), seconds

    def reset_peak(self) -> None:
        pass

    def peak_cuda_mb(self) -> float | None:
        return None

    def object_fields(self, row) -> dict:
        return {}


# --------------------------------------------------------------------------- result
@dataclass
class BenchmarkResult(ScoringReport):
    """What :func:`run_benchmark` computed and wrote, with the DSC plot's path (``None``
    without matplotlib)."""

    plot_path: Path | None = None


def run_benchmark(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    checkpoint: str | Path | None = None,
    baseline: str | None = None,
    model=None,
    contract: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    jitter: float = 0.0,
    seed: int = 0,
    max_objects: int | None = None,
    datasets: Sequence[str] = (),
    tolerance_mm: float = 2.0,
    name: str | None = None,
    plot: bool = True,
    zoom: ZoomPolicy | bool | str | None = "auto",
    log: Callable[[str], None] = lambda message: None,
) -> BenchmarkResult:
    """Score a model or a baseline on ``split`` of ``corpus``; write the outputs to ``out_dir``.

    Args:
        checkpoint: model weights; ``None`` (and no ``model``/``baseline``) = the embedded default.
        baseline: ``"box"`` or ``"otsu"`` instead of a model.
        model: an already loaded :class:`MedSAMModel` (takes precedence over ``checkpoint``).
        jitter: box jitter in pixels of a 1024-pixel longest side (0 = exact boxes).
        seed: seeds the jitter and the ``max_objects`` subset.
        max_objects: at most this many objects per dataset (a seeded random subset).
        datasets: only these datasets (default all of the split).
        name: method name in the outputs (default: ``default``, the checkpoint's stem, or
            ``baseline-box`` / ``baseline-otsu``).
        zoom: as :class:`medsam.Predictor` takes it: ``"auto"`` (default) the model's recipe, as a
            user of the predictor gets it (small boxes on a magnified crop for 256 px models),
            a :class:`medsam.zoom.ZoomPolicy` or ``True`` always, ``None`` or ``False`` never. A
            zoomed box costs one extra embedding, counted in the decode time.
    """
    from .corpus import read_manifest

    if baseline is not None and (checkpoint is not None or model is not None):
        raise ValueError("give either a checkpoint (or model) or a baseline, not both")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if max_objects is not None and max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    corpus = Path(corpus)
    out = Path(out_dir)
    rows = read_manifest(corpus, split=split, datasets=tuple(datasets))
    if not rows:
        known = sorted({r.split for r in read_manifest(corpus)})
        raise ValueError(
            f"no manifest rows in split {split!r}"
            + (f" for datasets {', '.join(datasets)}" if datasets else "")
            + f" of {corpus} (splits present: {', '.join(known) or 'none'})"
        )
    rows, subsampled = select_objects(rows, max_objects, seed)

    model_info: dict = {}
    if baseline is not None:
        method = BaselineMethod(baseline)
        method_name = name or f"baseline-{baseline}"
        model_info = {"baseline": baseline}
    else:
        if model is None:
            from .segment import load_reporting

            model = load_reporting(checkpoint, device, contract, log)
        method = PredictorMethod(model, contract=contract, precision=precision, zoom=zoom)
        method_name = name or ("default" if checkpoint is None else Path(str(checkpoint)).name.split(".")[0])
        model_info = {
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "architecture": model.config.name,
            "contract": method.predictor.contract.name,
            "untrained_default": bool(getattr(model, "is_untrained_default", False)),
            "device": str(method.device),
            "precision": precision,
            "zoom": None if method.predictor.zoom is None else dataclasses.asdict(method.predictor.zoom),
        }
    out.mkdir(parents=True, exist_ok=True)

    scored = score_objects(
        corpus, rows, method, jitter=jitter, seed=seed, tolerance_mm=tolerance_mm, log=log, name=method_name
    )
    objects, slices, errors, total_s = scored.objects, scored.slices, scored.errors, scored.seconds
    if not objects:
        raise ValueError(
            f"no object could be scored ({len(errors)} errors; see the first: {errors[0]['error'] if errors else '-'})"
        )

    summary = summarize(objects, slices)
    import torch

    info = {
        "method": method_name,
        "corpus": str(corpus),
        "split": split,
        "datasets": list(datasets),
        "jitter": jitter,
        "seed": seed,
        "max_objects": max_objects,
        "subsampled": subsampled,
        "tolerance_mm": tolerance_mm,
        "objects": len(objects),
        "slices": len(slices),
        "errors": len(errors),
        "seconds": round(total_s, 3),
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "medsam": __version__,
        "warmup": "one untimed embedding before the first timed slice" if baseline is None else None,
        **model_info,
    }
    write_table(out / "objects.csv", OBJECT_COLUMNS, objects)
    write_table(out / "slices.csv", SLICE_COLUMNS, slices)
    write_table(out / "errors.csv", ERROR_COLUMNS, errors)
    write_table(out / "summary.csv", SUMMARY_COLUMNS, summary)
    plot_path, plot_note = (None, "plot not requested")
    if plot:
        plot_path, plot_note = plot_dsc_by_structure(summary, out / "dsc_by_structure.png", title=method_name)
    info["plot"] = plot_note
    write_text(out / "summary.md", summary_markdown(summary, info, errors))
    write_text(out / "run.json", json.dumps(info, indent=2))
    return BenchmarkResult(out, method_name, objects, slices, errors, summary, info=info, plot_path=plot_path)


# --------------------------------------------------------------------------- summary
def _f(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_markdown(summary: Sequence[dict], info: dict, errors: Sequence[dict] = ()) -> str:
    """The ``summary.md`` text: settings, then one table per level."""
    lines = [f"# Benchmark: {info.get('method')}", ""]
    settings = [
        f"corpus `{info.get('corpus')}`, split `{info.get('split')}`",
        f"objects {info.get('objects')}, slices {info.get('slices')}, errors {info.get('errors')}",
        f"box jitter {info.get('jitter')} px at 1024 (seed {info.get('seed')}), "
        f"NSD tolerance {info.get('tolerance_mm')} mm",
    ]
    if info.get("subsampled"):
        settings.append(
            "subsampled (seeded): "
            + ", ".join(f"{d} {v['kept']} of {v['rows']} objects" for d, v in info["subsampled"].items())
        )
    if info.get("baseline"):
        settings.append(f"baseline `{info['baseline']}`")
    else:
        settings.append(
            f"model {info.get('architecture')} (contract {info.get('contract')}), checkpoint "
            f"`{info.get('checkpoint') or 'embedded default'}`, {info.get('device')}, {info.get('precision')}, "
            f"torch {info.get('torch')} with {info.get('torch_threads')} threads"
        )
    settings.append(f"total {info.get('seconds')} s, peak RSS {_f(info.get('peak_rss_mb'), 0)} MB")
    lines += [f"- {s}" for s in settings] + [""]
    headers = {
        "all": ("Overall", ()),
        "modality": ("By modality", ("modality",)),
        "case": ("By dataset and case", ("dataset", "case", "modality")),
        "group": ("By structure group", ("dataset", "modality", "group")),
        "structure": ("By structure", ("dataset", "modality", "structure")),
    }
    for level, (title, keys) in headers.items():
        rows = [r for r in summary if r["level"] == level]
        if not rows:
            continue
        timing = level in ("all", "modality", "case")
        cols = list(keys) + ["objects", "DSC mean", "DSC median", "NSD mean", "NSD median"]
        if level != "structure":
            cols += ["DSC per-structure mean", "NSD per-structure mean"]
        if timing:
            cols += ["embed s/slice", "decode s/slice"]
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [str(r[k]) for k in keys] + [
                str(r["objects"]),
                _f(r["dsc_mean"]),
                _f(r["dsc_median"]),
                _f(r["nsd_mean"]),
                _f(r["nsd_median"]),
            ]
            if level != "structure":
                cells += [_f(r["dsc_structure_mean"]), _f(r["nsd_structure_mean"])]
            if timing:
                cells += [_f(r["embed_s_mean"]), _f(r["decode_s_mean"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if errors:
        lines += ["## Rows skipped", "", "| dataset | case | slice | label | error |", "|---|---|---|---|---|"]
        lines += [
            f"| {e['dataset']} | {e['case']} | {e['slice']} | {e['label_name']} | {e['error']} |" for e in errors[:50]
        ]
        if len(errors) > 50:
            lines.append(f"| ... | | | | {len(errors) - 50} more in errors.csv |")
        lines.append("")
    lines += [f"Plot: {info.get('plot')}", ""]
    return "\n".join(lines)


def write_table(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """A benchmark CSV: floats to 6 significant digits, empty cells for None (atomic)."""
    write_csv(path, columns, rows, float_format="{:.6g}")


# --------------------------------------------------------------------------- plot
def plot_dsc_by_structure(summary: Sequence[dict], path: Path, title: str = "") -> tuple[Path | None, str]:
    """Horizontal bars of mean DSC (and NSD dots) per structure; returns (path, note)."""
    rows = [r for r in summary if r["level"] == "structure"]
    if not rows:
        return None, "no structures to plot"
    rows = sorted(rows, key=lambda r: (r["dataset"], -r["dsc_mean"]))
    labels = [f"{r['dataset']}: {r['structure']} (n={r['objects']})" for r in rows]
    dsc = [r["dsc_mean"] for r in rows]
    nsd = [r["nsd_mean"] for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pillow(labels, dsc, nsd, path, title)
        return path, f"{path.name} (drawn with Pillow; matplotlib is not installed)"
    height = max(2.5, 0.2 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    y = np.arange(len(rows))
    ax.barh(y, dsc, color="#3b75af", label="DSC")
    ax.plot(nsd, y, "o", color="#ef8636", markersize=3, label="NSD (2 mm)")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean over objects")
    ax.set_title(title or "DSC by structure")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path, path.name


def _plot_pillow(labels: list[str], dsc: list[float], nsd: list[float], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    bar_h, gap, left, width, top = 10, 3, 8 + 6 * max(len(s) for s in labels), 400, 28
    H = top + len(labels) * (bar_h + gap) + 30
    W = left + width + 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), (title or "DSC by structure") + "  (bars: DSC, dots: NSD 2 mm)", fill="black", font=font)
    for k in range(0, 11, 2):
        x = left + width * k / 10
        d.line([(x, top - 4), (x, H - 24)], fill=(220, 220, 220))
        d.text((x - 6, H - 20), f"{k / 10:.1f}", fill="black", font=font)
    for i, (name, v, n) in enumerate(zip(labels, dsc, nsd)):
        y = top + i * (bar_h + gap)
        d.text((8, y - 1), name, fill="black", font=font)
        d.rectangle([left, y, left + width * max(0.0, min(1.0, v)), y + bar_h], fill=(59, 117, 175))
        cx = left + width * max(0.0, min(1.0, n))
        d.ellipse([cx - 3, y + bar_h / 2 - 3, cx + 3, y + bar_h / 2 + 3], fill=(239, 134, 54))
    tmp = path.with_name(path.stem + ".tmp.png")
    img.save(tmp, format="PNG")
    tmp.replace(path)


# --------------------------------------------------------------------------- compare
def _read_summary(run_dir: Path) -> tuple[str, list[dict]]:
    path = run_dir / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.csv in {run_dir} (not a benchmark output folder)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    name = run_dir.name
    info_path = run_dir / "run.json"
    if info_path.is_file():
        name = json.loads(info_path.read_text()).get("method", name)
    return name, rows


def compare_runs(
    run_dirs: Sequence[str | Path], levels: Sequence[str] = ("all", "modality", "case", "group")
) -> tuple[list[dict], str]:
    """Side-by-side DSC / NSD means of several benchmark outputs: (CSV rows, Markdown table).

    Rows are matched on (level, dataset, case, modality, group, structure). With two runs or more
    whose ``objects.csv`` is kept, the Markdown also holds the paired differences of the first run
    from each other one (:func:`paired_differences`).
    """
    runs = [_read_summary(Path(d)) for d in run_dirs]
    keys: OrderedDict[tuple, dict] = OrderedDict()
    key_cols = ("level", "dataset", "case", "modality", "group", "structure")
    for _, rows in runs:
        for r in rows:
            if r["level"] in levels:
                keys.setdefault(tuple(r[c] for c in key_cols), {"objects": r["objects"]})
    order = {lv: i for i, lv in enumerate(levels)}
    ordered = sorted(keys, key=lambda k: (order[k[0]], k[1:]))
    table = []
    for k in ordered:
        row = dict(zip(key_cols, k))
        row["objects"] = keys[k]["objects"]
        for name, rows in runs:
            match = next((r for r in rows if tuple(r[c] for c in key_cols) == k), None)
            row[f"{name} DSC"] = float(match["dsc_mean"]) if match else None
            row[f"{name} NSD"] = float(match["nsd_mean"]) if match else None
        table.append(row)
    names = [n for n, _ in runs]
    head = ["level", "dataset / case", "modality", "group", "objects"] + [f"{n} DSC / NSD" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        where = row["dataset"] + (f" / {row['case']}" if row["case"] else "")
        cells = [row["level"], where or "all", row["modality"] or "all", row["group"] or "-", str(row["objects"])]
        for n in names:
            d, s = row[f"{n} DSC"], row[f"{n} NSD"]
            cells.append("-" if d is None else f"{d:.3f} / {s:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    paths = [Path(d) for d in run_dirs]
    if len(paths) > 1 and all((p / "objects.csv").is_file() for p in paths):
        lines += [
            "",
            f"Paired differences, {names[0]} minus each method, over the objects both scored "
            f"(mean [95 % bootstrap interval], resampling slices, {PAIRED_RESAMPLES} resamples, seed 0):",
            "",
            "| method | objects | slices | DSC difference | NSD difference |",
            "|---|---|---|---|---|",
        ]
        for name, path in zip(names[1:], paths[1:]):
            p = paired_differences(paths[0], path)
            if p["objects"] == 0:
                lines.append(f"| {name} | 0 | 0 | - | - |")
                continue
            cells = [f"{p[m][0]:+.3f} [{p[m][1]:+.3f}, {p[m][2]:+.3f}]" for m in ("dsc", "nsd")]
            lines.append(f"| {name} | {p['objects']} | {p['slices']} | {cells[0]} | {cells[1]} |")
    return table, "\n".join(lines) + "\n"


PAIRED_RESAMPLES = 2000


def _object_scores(run_dir: Path) -> dict[tuple[str, str, int, int], tuple[float, float]]:
    """(dataset, case, slice, label) -> (DSC, NSD) from a benchmark output's ``objects.csv``."""
    with open(run_dir / "objects.csv", newline="") as f:
        return {
            (r["dataset"], r["case"], int(r["slice"]), int(r["label"])): (float(r["dsc"]), float(r["nsd"]))
            for r in csv.DictReader(f)
        }


def paired_differences(run_dir: str | Path, other_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """``run_dir``'s DSC and NSD minus ``other_dir``'s over the objects both scored, matched on
    (dataset, case, slice, label): ``{"objects", "slices", "dsc": (mean, low, high), "nsd": ...}``,
    the interval a 95 % bootstrap resampling slices (:func:`medsam.scoring.paired_bootstrap`)."""
    from .scoring import paired_bootstrap

    first, other = _object_scores(Path(run_dir)), _object_scores(Path(other_dir))
    common = sorted(set(first) & set(other))
    out: dict[str, Any] = {"objects": len(common), "slices": len({k[:3] for k in common})}
    if not common:
        return out
    clusters = [k[:3] for k in common]
    for i, metric in enumerate(("dsc", "nsd")):
        diff = [first[k][i] - other[k][i] for k in common]
        out[metric] = paired_bootstrap(diff, clusters, resamples=PAIRED_RESAMPLES, seed=seed)
    return out
