"""The evaluation engine (medsam.scoring): one prompt construction and one loop for the benchmark,
the specialist and the workbench's training job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam.corpus import ManifestRow, read_manifest
from medsam.scoring import PredictorMethod, object_box, score_objects, summarize
from medsam.train.synthetic import write_synthetic_corpus


def _row(x0, y0, x1, y1, **kw):
    base = dict(
        dataset="d",
        case="c",
        slice=0,
        label=1,
        label_name="l",
        modality="CT",
        area=1,
        split="test",
        path="p.npz",
        height=20,
        width=30,
    )
    return ManifestRow(x0=x0, y0=y0, x1=x1, y1=y1, **{**base, **kw})


def test_object_box_rules():
    assert object_box(_row(2, 3, 9, 12), (20, 30)).tolist() == [2, 3, 9, 12]
    assert object_box(_row(4, 5, 4, 5), (20, 30)).tolist() == [4, 5, 5, 6]  # one pixel: closed on the far side
    assert object_box(_row(29, 19, 29, 19), (20, 30)).tolist() == [29, 19, 30, 20]  # the far edge
    assert "outside" in object_box(_row(2, 3, 30, 12), (20, 30))
    a = object_box(_row(10, 10, 14, 14), (20, 30), jitter=200, seed=3)
    b = object_box(_row(10, 10, 14, 14), (20, 30), jitter=200, seed=3)
    c = object_box(_row(10, 10, 14, 14, case="other"), (20, 30), jitter=200, seed=3)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()  # seeded per object
    assert a[0] <= 10 and a[1] <= 10 and a[2] >= 14 and a[3] >= 14


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("c"), cases={"train": 1, "val": 2, "test": 2}, slices_per_case=2, size=48
    )


def test_benchmark_and_workbench_score_the_same_objects_alike(corpus, tmp_path):
    """The benchmark and the workbench's held-out scoring give the same DSC and NSD per object."""
    from medsam.benchmark import run_benchmark
    from medsam.model import build_model
    from medsam.server.training_job import HELDOUT_SPLIT, score_heldout

    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    bench = run_benchmark(corpus, tmp_path / "b", split=HELDOUT_SPLIT, model=model, plot=False)
    held = score_heldout(model, corpus)
    key = lambda o: (o["case"], int(o["slice"]), int(o["label"]))
    b = {key(o): (o["dsc"], o["nsd"]) for o in bench.objects}
    h = {key(o): (o["dsc"], o["nsd"]) for o in held}
    assert b.keys() == h.keys() and len(b) == len(read_manifest(corpus, HELDOUT_SPLIT))
    for k in b:
        assert b[k] == pytest.approx(h[k], abs=1e-9), k


def test_errors_are_rows_and_summary_statistics(corpus, tmp_path):
    torch.manual_seed(0)
    from medsam.model import build_model

    rows = list(read_manifest(corpus, "test"))
    ghost = ManifestRow(**{**rows[0].__dict__, "label": 9, "label_name": "ghost"})
    outside = ManifestRow(**{**rows[1].__dict__, "x1": 500})
    scored = score_objects(corpus, [*rows, ghost, outside], PredictorMethod(build_model("vit_tiny").eval()))
    assert len(scored.objects) == len(rows) and len(scored.errors) == 2
    assert {e["error"].split()[0] for e in scored.errors} == {"label", "box"}
    summary = summarize(scored.objects, scored.slices)
    top = next(r for r in summary if r["level"] == "all")
    dsc = np.array([o["dsc"] for o in scored.objects])
    assert top["dsc_mean"] == pytest.approx(dsc.mean()) and top["dsc_std"] == pytest.approx(dsc.std())
    assert top["dsc_median"] == pytest.approx(np.median(dsc)) and top["objects"] == len(rows)
