"""Curation on Dask, corpus shards, and training that streams them.

- ``medsam prepare`` on a local Dask cluster of two workers writes the same corpus as one process
  (manifests and slice files byte for byte, case records but for their timings);
- shards hold every slice file byte for byte, read back through ``load_slice``; their checksums
  catch a changed byte; a rerun after new or changed cases writes only those shards; Dask writes
  the same shard bytes as one process;
- training on a shard folder equals training on the corpus (one process); under torchrun two
  ranks each read only their own shards, make the same number of steps and end equal.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam.corpus import load_slice, read_manifest
from medsam.corpus.shards import ShardedCorpus, verify_shards, write_shards
from medsam.train.synthetic import write_synthetic_corpus
from test_prepare import ct_spec, make_cases
from test_train_loop import micro_overrides

pytest.importorskip("distributed")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
_TIMING_KEYS = {"seconds", "created", "updated", "finished", "started", "max_rss_mb"}


def _case_json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in _TIMING_KEYS}


def test_prepare_on_a_local_dask_cluster_equals_one_process(tmp_path):
    from medsam.curate.prepare import prepare

    img, lab = make_cases(tmp_path / "src", 4)
    spec = ct_spec(images=img, labels=lab)
    one = prepare([spec], tmp_path / "one", workers=1, progress=False)
    two = prepare([spec], tmp_path / "dask", workers=2, engine="dask", progress=False)
    assert one.ok and two.ok and one.n_processed == two.n_processed == 4
    a, b = tmp_path / "one", tmp_path / "dask"
    for name in ("manifest.csv", "summary.csv", "errors.csv", "manifest.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    files_a = sorted(p.relative_to(a) for p in (a / "cases").rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in (b / "cases").rglob("*") if p.is_file())
    assert len(files_a) > 8
    for rel in files_a:
        if rel.suffix == ".npz":  # the slice files byte for byte
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        else:  # the case records but for their timings
            assert _case_json(a / rel) == _case_json(b / rel), rel
    # A rerun on Dask resumes: nothing left to do.
    again = prepare([spec], b, workers=2, engine="dask", progress=False)
    assert again.n_processed == 0 and again.n_skipped == 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("corpus"), cases={"train": 5, "val": 1}, slices_per_case=4, seed=3
    )


def test_shards_hold_every_slice_file_and_read_back_through_load_slice(corpus, tmp_path):
    out = tmp_path / "shards"
    rep = write_shards(corpus, out, samples_per_shard=6)
    slices = sorted(p.relative_to(corpus).as_posix() for p in (corpus / "cases").rglob("*.npz"))
    assert rep.samples == len(slices) == 24 and rep.shards == 3 and not rep.failed  # 2 cases (8 files) each
    sharded = ShardedCorpus(out)
    for rel in slices:
        assert sharded.read_bytes(rel) == (corpus / rel).read_bytes()
    rows = read_manifest(out)
    assert list(rows) == list(read_manifest(corpus)) and len(rows) > 0
    for row in rows:
        for x, y in zip(load_slice(out, row), load_slice(corpus, row)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not (out / "cases").exists()  # the shard folder does not need the slice files
    # Every slice file of a case is in one shard; the index lists the shards' checksums.
    index = json.loads((out / "shards.json").read_text())
    cases = [tuple(c[:2]) for s in index["shards"] for c in s["cases"]]
    assert len(cases) == len(set(cases)) == 6
    assert verify_shards(out) == []
    tar = out / "shards" / f"{index['shards'][1]['name']}.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 1
    tar.write_bytes(bytes(data))
    assert verify_shards(out) == [index["shards"][1]["name"]]


def test_a_rerun_writes_only_the_shards_of_new_or_changed_cases(corpus, tmp_path):
    from medsam.corpus import index_corpus

    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)
    out = tmp_path / "shards"
    first = write_shards(src, out, samples_per_shard=8)
    assert len(first.written) == 3 and not first.kept
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}

    # a new case (a copy of one under another name), indexed again
    ds = sorted(p for p in (src / "cases").iterdir() if p.is_dir())[0]
    case = sorted(p for p in ds.iterdir() if p.is_dir())[0]
    shutil.copytree(case, ds / "zz_new_case")
    rec = json.loads((ds / "zz_new_case" / "case.json").read_text())
    rec["case"] = "zz_new_case"
    (ds / "zz_new_case" / "case.json").write_text(json.dumps(rec))
    index_corpus(src)
    second = write_shards(src, out, samples_per_shard=8)
    assert second.kept == sorted(n.removesuffix(".tar") for n in stamps) and len(second.written) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar") if p.name in stamps} == stamps
    assert second.samples == first.samples + 4
    assert "zz_new_case" in {c[1] for s in json.loads((out / "shards.json").read_text())["shards"] for c in s["cases"]}

    # a changed case: only its shard is written again
    rec["split"] = "val"
    (ds / "zz_new_case" / "case.json").write_text(json.dumps(rec))
    third = write_shards(src, out, samples_per_shard=8)
    assert third.removed == second.written and len(third.written) == 1 and len(third.kept) == 3

    # On Dask: the same shard bytes and the same index as one process.
    dask_out = tmp_path / "dask"
    rep = write_shards(src, dask_out, samples_per_shard=8, workers=2, engine="dask")
    fresh = tmp_path / "fresh"
    write_shards(src, fresh, samples_per_shard=8)
    assert not rep.failed and rep.shards == 4
    names = sorted(p.name for p in (fresh / "shards").iterdir())
    assert names == sorted(p.name for p in (dask_out / "shards").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(fresh / "shards", dask_out / "shards", names, shallow=False)
    assert not mismatch and not errors
    assert (fresh / "shards.json").read_bytes() == (dask_out / "shards.json").read_bytes()


def _fit(overrides: list[str]) -> dict[str, torch.Tensor]:
    from medsam.train.config import load_config
    from medsam.train.distributed import DistInfo
    from medsam.train.loop import Trainer

    trainer = Trainer(load_config(None, overrides), DistInfo())
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_training_on_a_shard_folder_equals_training_on_the_corpus(corpus, tmp_path):
    out = tmp_path / "shards"
    write_shards(corpus, out, samples_per_shard=6)
    steps = ["train.max_steps=3", "train.save_every=0", "data.augment.flip_prob=0.5"]
    a = _fit(micro_overrides(corpus, tmp_path / "a", *steps))
    b = _fit(micro_overrides(out, tmp_path / "b", *steps))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: Path) -> list[list[str]]:  # step, epoch, split, modality, loss
        return [line.split(",")[:5] for line in (run / "metrics.csv").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) > 1


RANK_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from medsam.corpus.shards import sharded_corpus
from medsam.train.config import load_config
from medsam.train.distributed import init_distributed, cleanup
from medsam.train.loop import Trainer
from pathlib import Path
out, shards = sys.argv[1], Path(sys.argv[2])
info = init_distributed("cpu")
trainer = Trainer(load_config(None, sys.argv[3:]), info)
trainer.fit()
torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{info.rank}.pt")
opened = sorted(sharded_corpus(shards)._members)
json.dump({"opened": opened, "steps": trainer.global_step, "rows": len(trainer.train_set)},
          open(f"{out}/rank{info.rank}.json", "w"))
cleanup(info)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_nodes_read_only_their_own_shards_and_share_validation(corpus, tmp_path):
    """Two torchrun launches with one rendezvous endpoint, as two machines would start."""
    from medsam.train.config import load_config
    from medsam.train.trainable import build_initial_model
    from medsam.train.validate import validate

    out = tmp_path / "shards"
    write_shards(corpus, out, samples_per_shard=4)  # one case per shard: 6 shards
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    overrides = micro_overrides(out, run_dir / "run", "train.max_steps=4", "train.save_every=0", "train.val_every=4")
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            [
                TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "medsam-test",
                str(script),
                str(run_dir),
                str(out),
                *overrides,
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), logs[0][-2000:] + logs[1][-2000:]

    index = json.loads((out / "shards.json").read_text())
    train_cases = {(r.dataset, r.case) for r in read_manifest(out, "train")}
    train_shards = {k for k, s in enumerate(index["shards"]) if any(tuple(c[:2]) in train_cases for c in s["cases"])}
    ranks = [json.loads((run_dir / f"rank{k}.json").read_text()) for k in (0, 1)]
    for k, info in enumerate(ranks):
        mine = [s for s in info["opened"] if s in train_shards]
        assert mine and all(s % 2 == k for s in mine), info  # training reads only its own shards
        assert info["steps"] == 4
    assert ranks[0]["rows"] + ranks[1]["rows"] == len(read_manifest(out, "train"))
    w0 = torch.load(run_dir / "rank0.pt", weights_only=True)
    w1 = torch.load(run_dir / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients averaged: the ranks stay equal

    # The validation both ranks shared equals one process validating every slice.
    val = [ln.split(",") for ln in (run_dir / "run" / "metrics.csv").read_text().splitlines() if ",val,all," in ln]
    header = (run_dir / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    logged = dict(zip(header, val[-1]))
    cfg = load_config(None, overrides)
    model = build_initial_model(cfg.model, 0)
    model.load_state_dict(w0)
    from medsam.preprocess import get_contract
    from medsam.train.data import ValidationSlices

    rows = read_manifest(out, "val")[: cfg.data.val_max_samples]
    whole = validate(model, ValidationSlices(out, rows, get_contract(model.contract, model.input_size)))
    assert float(logged["dsc"]) == pytest.approx(whole["all"]["dsc"], rel=2e-6, abs=1e-7)
    assert float(logged["nsd"]) == pytest.approx(whole["all"]["nsd"], rel=2e-6, abs=1e-7)


# ----------------------------------------------------------------------------- embeddings on the engine
def test_embedding_store_computed_on_dask_is_reused_by_training_and_resumes(corpus, tmp_path):
    from medsam.cluster import DaskEngine
    from medsam.train.config import load_config
    from medsam.train.embedding_store import EmbeddingStore
    from medsam.train.loop import Trainer

    def overrides(store, run):
        return micro_overrides(
            corpus, tmp_path / run, "train.mode=decoder", f"data.cache_embeddings={store}", "train.max_steps=2"
        )

    local = Trainer(load_config(None, overrides(tmp_path / "local", "a")))
    assert local.train_set.store is not None
    with DaskEngine(workers=2) as engine:
        Trainer(load_config(None, overrides(tmp_path / "dask", "b")), store_engine=engine)
    a, b = EmbeddingStore(tmp_path / "local"), EmbeddingStore(tmp_path / "dask")
    assert a.fingerprint == b.fingerprint and a.index == b.index and len(a) == 20
    for key in a.index:  # the same encoder, run in other processes
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-3)
    assert (tmp_path / "dask" / "encoder.safetensors").is_file()

    # Training finds the store finished: nothing is computed again.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dask").glob("part-*")}
    Trainer(load_config(None, overrides(tmp_path / "dask", "c")))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dask").glob("part-*")} == stamps

    # An interrupted build keeps its finished parts.
    from medsam.corpus import read_manifest as rm
    from medsam.preprocess import get_contract
    from medsam.train.embedding_store import build_embedding_store

    model = local.model
    contract = get_contract(model.contract, model.input_size)
    rows = rm(corpus, "train")
    folder = tmp_path / "parts"
    build_embedding_store(model, corpus, rows, contract, folder, None, part_rows=8)
    assert sorted(p.name for p in folder.glob("part-*.f16")) == [
        "part-000000.f16",
        "part-000001.f16",
        "part-000002.f16",
    ]
    (folder / "index.json").unlink()
    (folder / "part-000001.f16").unlink()
    kept = (folder / "part-000000.f16").stat().st_mtime_ns
    store = build_embedding_store(model, corpus, rows, contract, folder, None, part_rows=8)
    assert (folder / "part-000000.f16").stat().st_mtime_ns == kept and (folder / "part-000001.f16").is_file()
    for key in store.index:
        torch.testing.assert_close(store[key], a[key], rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------- the commands
def test_shard_and_embed_commands(corpus, tmp_path, capsys):
    from medsam.cli import main as cli_main

    out = tmp_path / "shards"
    assert cli_main(["shard", str(corpus), "-o", str(out), "--samples-per-shard", "8"]) == 0
    assert "3 shard(s) written" in capsys.readouterr().out
    assert cli_main(["shard", str(tmp_path / "nothing"), "-o", str(out)]) == 2

    store = tmp_path / "store"
    overrides = micro_overrides(out, tmp_path / "run", "train.mode=decoder", f"data.cache_embeddings={store}")
    assert cli_main(["embed", str(tmp_path / "missing.yaml"), *overrides]) == 2  # one error line
    assert cli_main(["embed", str(Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml"), *overrides]) == 0
    assert (store / "index.json").is_file() and f"embedding store ready: {store}" in capsys.readouterr().out

    assert cli_main(["shard", str(corpus), "-o", str(out), "--verify"]) == 0
    tar = sorted((out / "shards").glob("*.tar"))[1]
    record = json.loads(tar.with_name(tar.name + ".json").read_text())
    offset, _size = next(iter(record["members"].values()))
    data = bytearray(tar.read_bytes())
    data[offset + 40] ^= 1  # inside the first slice file
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["shard", str(corpus), "-o", str(out), "--verify"]) == 1
    assert f"checksum mismatch: {tar.stem}" in capsys.readouterr().out


def _dies_once(path: str) -> str:
    """Kill this worker process the first time (a crash, not an exception), then succeed."""
    marker = Path(path)
    if not marker.exists():
        marker.write_text("died")
        os._exit(1)
    return marker.read_text()


def test_a_task_whose_worker_dies_is_run_again(tmp_path):
    from medsam.cluster import DaskEngine

    with DaskEngine(workers=2) as engine:
        results = list(engine.map(_dies_once, [str(tmp_path / "a"), str(tmp_path / "b")], name="die"))
    assert sorted((item, result, error) for item, result, error in results) == [
        (str(tmp_path / "a"), "died", None),
        (str(tmp_path / "b"), "died", None),
    ]
