#!/usr/bin/env python
"""Numbers of docs/scale.md: curation on Dask by worker count, and streaming shards against the
per-file corpus, in one run each.

    python benchmarks/scale_bench.py curation [--cases 12] [--workers 1 2 4]
    python benchmarks/scale_bench.py streaming [--cases 40] [--slices 8] [--size 256]

``curation``: synthetic CT-like volumes (seeded; 64 x 256 x 256 int16 HU with three labelled
ellipsoids, NIfTI, 1 x 1 x 2.5 mm) curated by ``prepare`` with the process pool (1 worker) and on a
local Dask cluster of each worker count, each into a fresh corpus; cases/s, slices/s, objects/s
(the cluster's start included) and the scaling against one Dask worker, and the seconds a local
cluster takes to start and stop on its own; every corpus's manifest is checked equal to the first.

``streaming``: a synthetic corpus (``write_synthetic_corpus``) packed by ``write_shards``; the
training dataset (``SegmentationDataset``, the LiteMedSAM contract) reads every sample once from
the corpus folder and once from the shard folder, with the page cache dropped before each pass
where this process may (root on Linux), then once more warm; samples/s of each.

Results are printed as JSON lines with the machine's CPU model and core count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def _machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count()}


def _drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _write_volumes(folder: Path, cases: int) -> Path:
    import numpy as np
    import SimpleITK as sitk

    img_dir, lab_dir = folder / "images", folder / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    z, y, x = np.mgrid[0:64, 0:256, 0:256].astype(np.float32)
    for k in range(cases):
        rng = np.random.default_rng(k)
        vol = np.full((64, 256, 256), -1000, np.int16)
        body = ((y - 128) / 110) ** 2 + ((x - 128) / 120) ** 2 <= 1
        vol[body] = 30
        lab = np.zeros(vol.shape, np.uint8)
        for organ in (1, 2, 3):
            c = rng.uniform([16, 70, 70], [48, 186, 186])
            r = rng.uniform([8, 15, 15], [14, 35, 35])
            inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
            lab[inside] = organ
            vol[inside] = 40 + 30 * organ
        vol = (vol + rng.normal(0, 8, vol.shape)).astype(np.int16)
        for arr, path in ((vol, img_dir / f"case{k:03d}.nii.gz"), (lab, lab_dir / f"case{k:03d}_seg.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.0, 1.0, 2.5))
            sitk.WriteImage(im, str(path))
    return folder


def curation(args: argparse.Namespace) -> None:
    from medsam.curate.dataset_spec import DatasetSpec
    from medsam.curate.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="medsam-scale-"))
    try:
        src = _write_volumes(tmp / "src", args.cases)
        spec = DatasetSpec.from_dict(
            dict(
                name="synthetic_ct",
                modality="CT",
                images=str(src / "images"),
                labels=str(src / "labels"),
                label_suffix="_seg",
                window="soft_tissue",
                label_names={1: "a", 2: "b", 3: "c"},
                label_source="synthetic",
            )
        )
        runs = [("pool", 1)] + [("dask", w) for w in args.workers]
        first, base = None, None
        for engine, workers in runs:
            start_s = None
            if engine == "dask":  # the cluster's start and stop alone
                from medsam.cluster import DaskEngine

                t0 = time.perf_counter()
                with DaskEngine(workers=workers):
                    pass
                start_s = round(time.perf_counter() - t0, 2)
            out = tmp / f"out-{engine}-{workers}"
            t0 = time.perf_counter()
            rep = prepare([spec], out, workers=workers, engine=engine, progress=False)
            dt = time.perf_counter() - t0
            manifest = (out / "manifest.csv").read_bytes()
            first = first or manifest
            row = {
                "bench": "curation",
                "engine": engine,
                "workers": workers,
                "cases": rep.n_processed,
                "seconds": round(dt, 2),
                "cases_per_s": round(rep.n_processed / dt, 3),
                "slices_per_s": round(rep.corpus_slices / dt, 1),
                "objects_per_s": round(rep.corpus_objects / dt, 1),
                "slices": rep.corpus_slices,
                "objects": rep.corpus_objects,
                "manifest_equal": manifest == first,
                "cluster_start_stop_s": start_s,
                **_machine(),
            }
            if engine == "dask":
                base = base or row["cases_per_s"]
                row["scaling_vs_1_dask_worker"] = round(row["cases_per_s"] / base, 2)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def streaming(args: argparse.Namespace) -> None:
    from medsam.corpus import read_manifest
    from medsam.corpus.shards import write_shards
    from medsam.preprocess import get_contract
    from medsam.train.data import PromptOptions, SegmentationDataset
    from medsam.train.synthetic import write_synthetic_corpus

    tmp = Path(tempfile.mkdtemp(prefix="medsam-stream-"))
    try:
        corpus = write_synthetic_corpus(
            tmp / "corpus", cases={"train": args.cases}, slices_per_case=args.slices, size=args.size, seed=1
        )
        t0 = time.perf_counter()
        rep = write_shards(corpus, tmp / "shards", samples_per_shard=args.samples_per_shard)
        shard_s = time.perf_counter() - t0
        rows = read_manifest(corpus, "train")
        contract = get_contract("lite", 256)
        prompts = PromptOptions(jitter=5.0)
        sources = (("corpus (one .npz per slice)", corpus), ("shards (tar)", tmp / "shards"))
        for state in ("cold", "warm", "cold", "warm"):  # interleaved, twice: order effects show
            for source, folder in sources:
                ds = SegmentationDataset(folder, rows, contract, 64, prompts=prompts, train=True, seed=0)
                dropped = _drop_caches() if state == "cold" else None
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[(0, i)]
                dt = time.perf_counter() - t0
                row = {
                    "bench": "streaming",
                    "source": source,
                    "cache": state if dropped is not False else "cold requested, page cache not dropped",
                    "samples": len(ds),
                    "samples_per_s": round(len(ds) / dt, 1),
                    "files": rep.shards if folder != corpus else len(list((folder / "cases").rglob("*.npz"))),
                    "shard_seconds": round(shard_s, 2),
                    **_machine(),
                }
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("curation")
    c.add_argument("--cases", type=int, default=12)
    c.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    s = sub.add_parser("streaming")
    s.add_argument("--cases", type=int, default=40)
    s.add_argument("--slices", type=int, default=8)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--samples-per-shard", type=int, default=64)
    args = ap.parse_args()
    curation(args) if args.what == "curation" else streaming(args)


if __name__ == "__main__":
    main()
