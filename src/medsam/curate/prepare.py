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

The corpus layout, its writer and its index are :mod:`medsam.corpus`.

The split is by case, computed per dataset from its sorted case list and seed
(:func:`medsam.curate.dataset_spec.assign_splits`), so it does not depend on
sharding or workers. ``manifest.csv``, ``summary.csv`` and ``errors.csv`` are
rebuilt at the end of every run from all finished cases' ``case.json``, so
shards run on several machines merge by copying their ``cases/`` (and
``errors/``) folders into one ``OUT`` and running ``prepare(..., merge_only=True)``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus import (
    CaseError,
    build_index,
    error_file,
    finished_case,
    read_json,
    write_case,
    write_corpus_json,
)
from ..intensity import RECIPES, Window, normalize_image, scale_to_uint8
from ..io import MedicalImage, read_image
from ..io.atomic import write_json
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
from .labels import align_label, curate_labels

__all__ = ["PrepareReport", "prepare"]

_PERCENTILES = (0.5, 99.5)


# --------------------------------------------------------------------------- report
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
            f"{self.corpus_objects} objects; split " + ", ".join(f"{k} {self.splits.get(k, 0)}" for k in SPLITS),
        ]
        for e in self.errors[:20]:
            lines.append(f"  error {e.dataset}/{e.case} [{e.stage}]: {e.error}")
        if len(self.errors) > 20:
            lines.append(f"  ... {len(self.errors) - 20} more in errors.csv")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------- intensities
class _Normalizer:
    """Per-slice intensity mapping equal to :func:`normalize_image` on the whole volume."""

    def __init__(self, image: MedicalImage, spec: DatasetSpec):
        self.color = image.is_color
        self.modality = spec.modality
        recipe = RECIPES[spec.modality]
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
            return Window(self.level, self.width).to_uint8(sl)
        if self.lo is None:
            return np.zeros(sl.shape, dtype=np.uint8)
        f = sl.astype(np.float64)
        out = scale_to_uint8(np.clip(f, self.lo, self.hi), self.lo, self.hi)
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
        ((s, norm(img_stack[s]) if not image.is_color else norm(None), lab_stack[s]) for s in kept),
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
    except Exception as exc:
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
    except Exception:
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
    except Exception:
        pass


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
    rec = finished_case(out, spec.name, case)
    return rec if rec and rec.get("fingerprint") == spec.processing_fingerprint() else None


def prepare(
    specs: Sequence[DatasetSpec | str | Path] | DatasetSpec | str | Path | None,
    out_dir: str | Path,
    workers: int = 2,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    merge_only: bool = False,
    engine: str = "pool",
    scheduler: str | None = None,
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
    engine:
        ``"pool"``: a process pool of this machine; ``"dask"``: one Dask task
        per case (:class:`medsam.cluster.DaskEngine`), on a local cluster of
        ``workers`` processes or on the cluster of ``scheduler``, a task whose
        worker died retried twice. On a cluster, the sources and ``out_dir``
        must be on a file system every worker sees.
    scheduler:
        Address of a running Dask scheduler (implies ``engine="dask"``).

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
    if scheduler:
        engine = "dask"
    if engine not in ("pool", "dask"):
        raise ValueError(f"engine must be 'pool' or 'dask', got {engine!r}")
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
                    _CaseTask(
                        spec,
                        c.case,
                        str(c.image),
                        str(c.label),
                        str(out),
                        split_maps[spec.name][c.case],
                        digest,
                        len(ids),
                    )
                )
        tasks.sort(key=lambda t: (t.spec.name, t.case))
        if shard is not None:
            tasks = [t for k, t in enumerate(tasks) if k % shard[1] == shard[0]]

    out.mkdir(parents=True, exist_ok=True)
    datasets = write_corpus_json(out, spec_list)

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
                    rec = read_json(f)
                    if rec and rec.get("stage") == "match":
                        f.unlink(missing_ok=True)
        for e in match_errors:
            write_json(error_file(out, e.dataset, e.case), e.__dict__)
        report.errors.extend(match_errors)

        report.n_cases = len(tasks)
        todo = []
        for t in tasks:
            if _is_done(out, t.spec, t.case) is not None:
                report.n_skipped += 1
                error_file(out, t.spec.name, t.case).unlink(missing_ok=True)
            else:
                todo.append(t)
        if engine == "dask":
            _run_tasks_dask(todo, out, workers, scheduler, progress, report)
        else:
            _run_tasks(todo, out, workers, progress, report)
        report.n_failed = sum(1 for e in report.errors if e.stage != "match")

    counts = build_index(out, split_maps, datasets)
    write_corpus_json(out, spec_list, counts)
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
        error_file(out, task.spec.name, task.case).unlink(missing_ok=True)
    else:
        err = CaseError(task.spec.name, task.case, res.get("stage", "?"), res.get("error", "?"), task.image, task.label)
        report.errors.append(err)
        write_json(error_file(out, err.dataset, err.case), err.__dict__)


def _run_tasks_dask(
    todo: list[_CaseTask], out: Path, workers: int, scheduler: str | None, progress: bool, report: PrepareReport
) -> None:
    from tqdm import tqdm

    from ..cluster import DaskEngine

    with DaskEngine(workers=workers, scheduler=scheduler) as engine:
        bar = tqdm(total=len(todo), unit="case", desc="prepare", disable=not progress or not todo)
        try:
            for task, res, error in engine.map(_process_case, todo, name="prepare"):
                if error is not None:
                    res = {"ok": False, "stage": "worker", "error": f"{type(error).__name__}: {error}; rerun to resume"}
                _record_result(res, task, out, report)
                bar.update(1)
        finally:
            bar.close()


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
        ex = ProcessPoolExecutor(
            max_workers=n, mp_context=ctx, initializer=_worker_init, initargs=(threads, os.getpid())
        )
        try:
            futs = {ex.submit(_process_case, t): t for t in todo}
            for fut in as_completed(futs):
                t = futs[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool as exc:
                    res = {"ok": False, "stage": "worker", "error": f"worker process died ({exc}); rerun to resume"}
                except Exception as exc:
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
