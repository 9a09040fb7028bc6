"""Writing a corpus: cases (``case.json`` and slice ``.npz``), the manifest, summary, errors and
``corpus.json``. See :mod:`medsam.corpus` for the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..io.atomic import atomic_output, write_csv, write_json
from .schema import (
    CASE_FORMAT,
    CORPUS_FORMAT,
    CORPUS_VERSION,
    ERROR_COLUMNS,
    INT_COLUMNS,
    MANIFEST_COLUMNS,
    SPLITS,
    SUMMARY_COLUMNS,
    CaseError,
    case_dir,
    error_file,
    finished_case,
    read_json,
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- writing cases
def _save_slice(path: Path, image: np.ndarray, label: np.ndarray, spacing: np.ndarray) -> None:
    """``np.savez_compressed``'s format (a deflated zip of ``.npy`` members) with every member
    dated 1980-01-01, so that the same slice is the same bytes whenever it is curated."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in (("image", image), ("label", label), ("spacing", spacing)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def slice_objects(label: np.ndarray) -> list[list[int]]:
    """``[label, x0, y0, x1, y1, area]`` of every label id present in a 2D label map (inclusive
    bounding box, x = column), in id order: the objects of one corpus slice."""
    from scipy import ndimage

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
    is written under a hidden temporary name and renamed when complete (replacing an older one).
    Returns the written record.
    """
    out = Path(out_dir)
    ds_dir = out / "cases" / dataset
    ds_dir.mkdir(parents=True, exist_ok=True)
    tmp = ds_dir / f".{case}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    final = ds_dir / case
    spacing_mm = np.asarray(spacing, dtype=np.float64)
    slices_rec = []
    n_objects = 0
    try:
        (tmp / "slices").mkdir(parents=True)
        for s, img2, lab2 in slices:
            img2 = np.ascontiguousarray(img2)
            lab2 = np.ascontiguousarray(lab2)
            objs = slice_objects(lab2)
            fname = f"slices/{int(s):04d}.npz"
            _save_slice(tmp / fname, img2, lab2, spacing_mm)
            slices_rec.append(
                {
                    "slice": int(s),
                    "file": fname,
                    "height": int(lab2.shape[0]),
                    "width": int(lab2.shape[1]),
                    "objects": objs,
                }
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
            "medsam_version": __version__,
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


# --------------------------------------------------------------------------- the index
def _case_records(out: Path) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = []
    root = out / "cases"
    if not root.is_dir():
        return recs
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for cdir in sorted(p for p in ds_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rec = finished_case(out, ds_dir.name, cdir.name)
            if rec:
                recs.append(rec)
    return recs


def _case_errors(out: Path) -> list[CaseError]:
    errs: list[CaseError] = []
    root = out / "errors"
    if not root.is_dir():
        return errs
    for f in sorted(root.glob("*/*.json")):
        rec = read_json(f)
        if rec:
            errs.append(CaseError(**{k: str(rec.get(k, "")) for k in ERROR_COLUMNS}))
    return errs


def write_manifest(out: Path, rows: Sequence[Sequence[Any]]) -> None:
    """``manifest.csv`` and, where pyarrow is installed, ``manifest.parquet`` (rows in
    :data:`MANIFEST_COLUMNS` order). A stale Parquet file is removed when pyarrow is missing."""
    write_csv(out / "manifest.csv", MANIFEST_COLUMNS, rows)
    parquet = out / "manifest.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        parquet.unlink(missing_ok=True)
        return
    columns: list[Sequence[Any]] = list(zip(*rows)) if rows else [[] for _ in MANIFEST_COLUMNS]
    arrays = [
        pa.array([int(v) for v in col], type=pa.int64())
        if name in INT_COLUMNS
        else pa.array([str(v) for v in col], type=pa.string())
        for name, col in zip(MANIFEST_COLUMNS, columns)
    ]
    table = pa.Table.from_arrays(arrays, names=list(MANIFEST_COLUMNS))
    with atomic_output(parquet) as tmp:
        pq.write_table(table, tmp, row_group_size=65536)


def build_index(
    out_dir: str | Path,
    splits: dict[str, dict[str, str]] | None = None,
    datasets: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """(Re)build the manifest, ``summary.csv`` and ``errors.csv`` from every finished case.

    ``splits`` (``{dataset: {case: split}}``) overrides the split recorded in ``case.json`` (and
    the record is updated); ``datasets`` are spec dicts, used for each dataset's
    ``label_source``. Returns the counts (cases, slices, objects, splits, errors, warnings).
    """
    out = Path(out_dir)
    splits = splits or {}
    src_of = {d["name"]: d.get("label_source", "") for d in (datasets or [])}
    rows: list[tuple[Any, ...]] = []
    agg: dict[tuple[str, str, int, str], dict[str, Any]] = {}  # (dataset, modality, label, name) -> totals
    ds_tot: dict[tuple[str, str], dict[str, Any]] = {}  # (dataset, modality) -> totals
    split_counts = dict.fromkeys(SPLITS, 0)
    digests: dict[str, set[str | None]] = defaultdict(set)
    recs = _case_records(out)
    for rec in recs:
        ds, case = rec["dataset"], rec["case"]
        split = splits.get(ds, {}).get(case, rec.get("split", "train"))
        if split != rec.get("split"):
            rec["split"] = split
            write_json(case_dir(out, ds, case) / "case.json", rec)
        digests[ds].add(rec.get("case_list_digest"))
        split_counts[split] = split_counts.get(split, 0) + 1
        modality = rec["modality"]
        names = rec.get("label_names", {})
        source = src_of.get(ds) or rec.get("label_source", "")
        tot = ds_tot.setdefault(
            (ds, modality),
            {"source": source, "cases": set(), "slices": 0, "objects": 0, "voxels": 0, "split_cases": defaultdict(set)},
        )
        tot["cases"].add(case)
        tot["split_cases"][split].add(case)
        for sl in rec["slices"]:
            tot["slices"] += 1
            path = f"cases/{ds}/{case}/{sl['file']}"
            for lid, x0, y0, x1, y1, area in sl["objects"]:
                name = names.get(str(lid), f"label_{lid}")
                rows.append(
                    (
                        ds,
                        case,
                        sl["slice"],
                        lid,
                        name,
                        modality,
                        x0,
                        y0,
                        x1,
                        y1,
                        area,
                        split,
                        path,
                        sl["height"],
                        sl["width"],
                    )
                )
                a = agg.setdefault(
                    (ds, modality, lid, name),
                    {
                        "source": source,
                        "cases": set(),
                        "slices": set(),
                        "objects": 0,
                        "voxels": 0,
                        "split_cases": defaultdict(set),
                    },
                )
                a["cases"].add(case)
                a["slices"].add((case, sl["slice"]))
                a["objects"] += 1
                a["voxels"] += area
                a["split_cases"][split].add(case)
                tot["objects"] += 1
                tot["voxels"] += area
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    write_manifest(out, rows)

    summary = []
    for (ds, modality), t in sorted(ds_tot.items()):
        summary.append(
            (
                ds,
                modality,
                "",
                "(all labels)",
                t["source"],
                len(t["cases"]),
                t["slices"],
                t["objects"],
                t["voxels"],
                *(len(t["split_cases"][s]) for s in SPLITS),
            )
        )
        for (ds2, mod2, lid, name), a in sorted(agg.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
            if (ds2, mod2) != (ds, modality):
                continue
            summary.append(
                (
                    ds,
                    modality,
                    lid,
                    name,
                    a["source"],
                    len(a["cases"]),
                    len(a["slices"]),
                    a["objects"],
                    a["voxels"],
                    *(len(a["split_cases"][s]) for s in SPLITS),
                )
            )
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary)

    done = {(r["dataset"], r["case"]) for r in recs}
    errors = []
    for e in _case_errors(out):
        if e.stage != "match" and (e.dataset, e.case) in done:  # failed once, finished since (e.g. merged)
            error_file(out, e.dataset, e.case).unlink(missing_ok=True)
        else:
            errors.append(e)
    write_csv(out / "errors.csv", ERROR_COLUMNS, [[getattr(e, c) for c in ERROR_COLUMNS] for e in errors])
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


def write_corpus_json(out: Path, specs: Sequence[Any], counts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Create or update ``corpus.json`` with ``specs`` (dataset specs, or dicts with at least a
    ``name``; one per dataset, newer replacing older) and ``counts``; returns the datasets."""
    path = Path(out) / "corpus.json"
    old = read_json(path) or {}
    if old and old.get("format") != CORPUS_FORMAT:
        raise ValueError(f"{path} is not a {CORPUS_FORMAT} file")
    datasets = {d["name"]: d for d in old.get("datasets", []) if isinstance(d, dict) and "name" in d}
    for s in specs:
        d = dict(s) if isinstance(s, dict) else s.to_dict()
        datasets[d["name"]] = d
    data: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "version": CORPUS_VERSION,
        "datasets": [datasets[k] for k in sorted(datasets)],
        "created": old.get("created") or _now(),
        "updated": _now(),
        "medsam_version": __version__,
        "label_sources": {k: datasets[k].get("label_source", "") for k in sorted(datasets)},
    }
    if counts is not None:
        data["counts"] = {k: counts[k] for k in ("cases", "slices", "objects", "splits")}
    elif "counts" in old:
        data["counts"] = old["counts"]
    write_json(path, data)
    written: list[dict[str, Any]] = data["datasets"]
    return written


def index_corpus(out_dir: str | Path, datasets: Sequence[Any] = ()) -> dict[str, Any]:
    """Finish a corpus whose cases were written with :func:`write_case`: the index
    (:func:`build_index`, splits as recorded in each ``case.json``) and ``corpus.json``
    (``datasets``: specs, or dicts with at least a ``name``). Returns the counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = write_corpus_json(out, datasets)
    counts = build_index(out, None, recorded)
    write_corpus_json(out, datasets, counts)
    return counts
