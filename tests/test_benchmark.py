"""``medsam benchmark`` on a tiny synthetic corpus: numbers against direct metric calls, baselines."""

import csv
import json

import numpy as np
import pytest

from medsam.benchmark import (
    box_baseline,
    compare_runs,
    jitter_box,
    otsu_baseline,
    run_benchmark,
    structure_group,
)
from medsam.metrics import dice_score, normalized_surface_dice
from medsam.train.synthetic import write_synthetic_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 2 test cases (one CT, one MR dataset) x 2 slices x 2 objects (ellipse, rectangle), 64 px
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("bench") / "corpus", cases={"train": 1, "test": 2}, slices_per_case=2, size=64
    )


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _path_of(corpus, row):
    return corpus / "cases" / row["dataset"] / row["case"] / "slices" / f"{int(row['slice']):04d}.npz"


def test_box_baseline_rectangle_is_exact_and_csv_matches_metrics(corpus, tmp_path):
    result = run_benchmark(corpus, tmp_path / "box", baseline="box")
    rows = _read(tmp_path / "box" / "objects.csv")
    assert len(rows) == 8 and result.info["errors"] == 0
    assert {r["split"] for r in rows} == {"test"}
    for r in rows:
        with np.load(_path_of(corpus, r)) as d:
            image, label, spacing = d["image"], d["label"], tuple(d["spacing"])
        gt = label == int(r["label"])
        box = [int(r[k]) for k in ("x0", "y0", "x1", "y1")]
        mask = box_baseline(image, box)
        assert float(r["dsc"]) == pytest.approx(dice_score(mask, gt), abs=1e-5)
        assert float(r["nsd"]) == pytest.approx(normalized_surface_dice(mask, gt, spacing, 2.0), abs=1e-5)
        assert int(r["pred_area"]) == (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        if r["label_name"] == "rectangle":  # the box of a rectangle is the rectangle
            assert float(r["dsc"]) == 1.0 and float(r["nsd"]) == 1.0
        else:
            assert float(r["dsc"]) < 0.95
        assert float(r["embed_s"]) == 0.0
    # summary: means over the objects.csv rows
    summary = _read(tmp_path / "box" / "summary.csv")
    overall = next(s for s in summary if s["level"] == "all")
    assert float(overall["dsc_mean"]) == pytest.approx(np.mean([float(r["dsc"]) for r in rows]), abs=1e-5)
    rect = next(
        s
        for s in summary
        if s["level"] == "structure" and s["structure"] == "rectangle" and s["dataset"] == "synthetic_ct"
    )
    assert float(rect["dsc_mean"]) == 1.0
    assert {s["level"] for s in summary} == {"all", "modality", "dataset", "case", "group", "structure"}
    md = (tmp_path / "box" / "summary.md").read_text()
    assert "baseline-box" in md and "## By structure" in md
    assert (tmp_path / "box" / "dsc_by_structure.png").stat().st_size > 0
    assert json.loads((tmp_path / "box" / "run.json").read_text())["baseline"] == "box"


def test_otsu_baseline_finds_bright_shapes(corpus, tmp_path):
    result = run_benchmark(corpus, tmp_path / "otsu", baseline="otsu")
    rows = _read(tmp_path / "otsu" / "objects.csv")
    for r in rows:
        with np.load(_path_of(corpus, r)) as d:
            image, label = d["image"], d["label"]
        mask = otsu_baseline(image, [int(r[k]) for k in ("x0", "y0", "x1", "y1")])
        assert float(r["dsc"]) == pytest.approx(dice_score(mask, label == int(r["label"])), abs=1e-5)
    # a bright ellipse on noise: Otsu inside its box recovers it (the filled box cannot: DSC < 0.95);
    # a rectangle fills its box, so Otsu splits the object's own noise and does worse than the box
    ellipse = [float(r["dsc"]) for r in rows if r["label_name"] == "ellipse"]
    assert min(ellipse) > 0.95
    assert result.info["objects"] == 8


def test_otsu_rule_dark_object_and_constant_box():
    image = np.full((40, 40), 200, np.uint8)
    image[10:30, 12:28] = 20  # a dark object filling the box's centre
    mask = otsu_baseline(image, [8, 6, 31, 33])
    assert mask[10:30, 12:28].all() and mask.sum() == 20 * 16
    flat = np.zeros((10, 10), np.uint8)
    assert otsu_baseline(flat, [2, 2, 5, 6]).sum() == 4 * 5  # constant box: filled


def test_model_one_embedding_per_slice_and_scores_match_predictor(corpus, tmp_path, tiny_model, monkeypatch):
    from medsam.predictor import Predictor

    calls = {"set_image": 0, "predict": []}
    set_image, predict = Predictor.set_image, Predictor.predict

    def counting_set_image(self, image):
        calls["set_image"] += 1
        return set_image(self, image)

    def counting_predict(self, boxes=None, **kw):
        calls["predict"].append(len(boxes))
        return predict(self, boxes=boxes, **kw)

    monkeypatch.setattr(Predictor, "set_image", counting_set_image)
    monkeypatch.setattr(Predictor, "predict", counting_predict)
    result = run_benchmark(corpus, tmp_path / "m", model=tiny_model, name="tiny", jitter=40, seed=3)
    assert calls["set_image"] == 4 + 1  # 4 slices, plus one untimed warm-up
    assert calls["predict"] == [2, 2, 2, 2]  # both objects of a slice in one call
    monkeypatch.undo()

    rows = _read(tmp_path / "m" / "objects.csv")
    predictor = Predictor(tiny_model)
    for r in rows:
        with np.load(_path_of(corpus, r)) as d:
            image, label, spacing = d["image"], d["label"], tuple(d["spacing"])
        box = np.array([float(r[k]) for k in ("px0", "py0", "px1", "py1")])
        gt_box = [int(r[k]) for k in ("x0", "y0", "x1", "y1")]
        # jittered outwards by at most round(40 * 64 / 1024) = 2 px, inside the image
        assert box[0] <= gt_box[0] and box[1] <= gt_box[1] and box[2] >= gt_box[2] and box[3] >= gt_box[3]
        assert np.all(np.abs(box - gt_box) <= 2) and box.min() >= 0 and box.max() <= 63
        predictor.set_image(image)
        mask = predictor.predict(boxes=box[None]).masks[0]
        gt = label == int(r["label"])
        assert float(r["dsc"]) == pytest.approx(dice_score(mask, gt), abs=1e-4)
        assert float(r["nsd"]) == pytest.approx(normalized_surface_dice(mask, gt, spacing, 2.0), abs=1e-4)
        assert float(r["embed_s"]) > 0 and float(r["decode_s"]) > 0
    slices = _read(tmp_path / "m" / "slices.csv")
    assert len(slices) == 4 and all(float(s["peak_rss_mb"]) > 0 for s in slices)
    assert result.info["method"] == "tiny" and result.info["contract"] == "medsam"

    # same seed, same boxes; another seed, other boxes
    again = run_benchmark(corpus, tmp_path / "m2", baseline="box", jitter=40, seed=3)
    assert [(o["px0"], o["py1"]) for o in again.objects] == [(float(r["px0"]), float(r["py1"])) for r in rows]
    other = run_benchmark(corpus, tmp_path / "m3", baseline="box", jitter=40, seed=4)
    assert [o["px0"] for o in other.objects] != [o["px0"] for o in again.objects] or [
        o["py1"] for o in other.objects
    ] != [o["py1"] for o in again.objects]


def test_bad_rows_are_reported_and_skipped(corpus, tmp_path):
    import shutil

    bad = tmp_path / "corpus"
    shutil.copytree(corpus, bad)
    rows = _read(bad / "manifest.csv")
    test_rows = [r for r in rows if r["split"] == "test"]
    (bad / test_rows[0]["path"]).write_bytes(b"not an npz")  # unreadable slice: its 2 rows
    extra = dict(test_rows[-1], label="7", label_name="ghost")  # a label absent from its slice
    with open(bad / "manifest.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(extra)
    result = run_benchmark(bad, tmp_path / "out", baseline="box")
    errors = _read(tmp_path / "out" / "errors.csv")
    assert len(errors) == 3 and len(result.objects) == 6
    assert sum("unreadable" in e["error"] for e in errors) == 2
    assert any(e["label_name"] == "ghost" and "not on its slice" in e["error"] for e in errors)
    assert "Rows skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_max_objects_datasets_and_cli(corpus, tmp_path, capsys):
    from medsam.cli import main

    sub = run_benchmark(corpus, tmp_path / "sub", baseline="box", max_objects=3, seed=1, datasets=["synthetic_mr"])
    assert len(sub.objects) == 3 and {o["dataset"] for o in sub.objects} == {"synthetic_mr"}
    assert sub.info["subsampled"] == {"synthetic_mr": {"rows": 4, "kept": 3}}

    assert (
        main(["benchmark", "--corpus", str(corpus), "--baseline", "box", "--no-plot", "-o", str(tmp_path / "a")]) == 0
    )
    assert (
        main(["benchmark", "--corpus", str(corpus), "--baseline", "otsu", "--no-plot", "-o", str(tmp_path / "b")]) == 0
    )
    out = capsys.readouterr().out
    assert "baseline-box: 8 objects" in out and "baseline-otsu: 8 objects" in out
    assert main(["benchmark", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c")]) == 0
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "baseline-box DSC / NSD" in md and "baseline-otsu DSC / NSD" in md
    table, _ = compare_runs([tmp_path / "a"])
    assert table[0]["level"] == "all" and table[0]["baseline-box DSC"] == pytest.approx(
        np.mean([float(r["dsc"]) for r in _read(tmp_path / "a" / "objects.csv")]), abs=1e-5
    )
    # expected failures: one line, exit 2
    assert (
        main(["benchmark", "--corpus", str(corpus), "--split", "nope", "--baseline", "box", "-o", str(tmp_path / "d")])
        == 2
    )
    assert "no manifest rows in split 'nope'" in capsys.readouterr().err
    assert main(["benchmark", "--corpus", str(tmp_path / "missing"), "-o", str(tmp_path / "e")]) == 2
    box_no_zoom = ["benchmark", "--corpus", str(corpus), "--baseline", "box", "--no-zoom", "-o", str(tmp_path / "f")]
    assert main(box_no_zoom) == 2
    assert "apply to models" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_a_model_is_scored_as_the_predictor_gives_it_zoomed_by_its_recipe_unless_told(tmp_path, tiny_model):
    """Default: the model's recipe, as a user of medsam.Predictor gets it (this 256 px model zooms
    a small box on a larger image); zoom=False: the whole image; both equal the predictor's masks."""
    from medsam.predictor import Predictor

    corpus = write_synthetic_corpus(tmp_path / "wide", cases={"test": 2}, slices_per_case=2, size=192)
    runs = {
        "auto": run_benchmark(corpus, tmp_path / "auto", model=tiny_model, plot=False),
        False: run_benchmark(corpus, tmp_path / "off", model=tiny_model, plot=False, zoom=False),
    }
    assert runs["auto"].info["zoom"]["context"] == 3.0 and runs[False].info["zoom"] is None
    zoomed = 0
    for choice, run in runs.items():
        predictor = Predictor(tiny_model, zoom=choice)
        for r in run.objects:
            with np.load(corpus / "cases" / r["dataset"] / r["case"] / "slices" / f"{int(r['slice']):04d}.npz") as d:
                image, label = d["image"], d["label"]
            predictor.set_image(image)
            prediction = predictor.predict(boxes=np.array([[r[k] for k in ("px0", "py0", "px1", "py1")]], float))
            zoomed += int(prediction.zoomed[0])
            assert r["dsc"] == pytest.approx(dice_score(prediction.masks[0], label == int(r["label"])), abs=1e-4)
    assert zoomed >= 1  # the recipe changed at least one object


def test_jitter_and_groups():
    rng = np.random.default_rng(0)
    assert np.array_equal(jitter_box([5, 6, 20, 30], 0, (64, 64), rng), [5, 6, 20, 30])
    boxes = np.array([jitter_box([0, 1, 60, 62], 1024, (64, 64), rng) for _ in range(50)])
    assert boxes[:, 0].min() == 0 and boxes[:, 2].max() == 63 and boxes[:, 3].max() == 63
    assert structure_group("rib_left_10") == "rib"
    assert structure_group("vertebrae_T12") == "vertebrae"
    assert structure_group("Frontal_Sup_Orb_L") == "Frontal_Sup_Orb"
    assert structure_group("Cerebelum_Crus1_R") == "Cerebelum_Crus1"
    assert structure_group("Vermis_4_5") == "Vermis"
    assert structure_group("liver") == "liver"


def test_paired_bootstrap_resamples_whole_slices():
    """The interval resamples clusters (slices) with all their objects; each object alone without
    clusters. Checked against a direct loop over the same draws."""
    from medsam.scoring import paired_bootstrap

    rng = np.random.default_rng(1)
    diff = rng.normal(0.05, 0.1, size=30)
    slices = [f"s{i // 3}" for i in range(30)]  # 10 slices of 3 objects (sorted keys = slice order)
    mean, lo, hi = paired_bootstrap(diff, slices, resamples=500, seed=4)
    draws = np.random.default_rng(4).integers(0, 10, size=(500, 10))
    loop = [np.concatenate([diff[3 * c : 3 * c + 3] for c in row]).mean() for row in draws]
    assert mean == pytest.approx(diff.mean())
    assert (lo, hi) == pytest.approx((np.percentile(loop, 2.5), np.percentile(loop, 97.5)))
    alone = paired_bootstrap(diff, resamples=500, seed=4)
    each = diff[np.random.default_rng(4).integers(0, 30, size=(500, 30))].mean(axis=1)
    assert alone[1:] == pytest.approx((np.percentile(each, 2.5), np.percentile(each, 97.5)))
    assert paired_bootstrap(np.full(8, 0.2), list("aabbccdd")) == pytest.approx((0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="cluster keys"):
        paired_bootstrap(diff, slices[:5])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([])


def test_compare_pairs_the_first_run_with_each_other(corpus, tmp_path):
    from medsam.benchmark import paired_differences

    box = run_benchmark(corpus, tmp_path / "box", baseline="box", plot=False)
    otsu = run_benchmark(corpus, tmp_path / "otsu", baseline="otsu", plot=False)
    _, markdown = compare_runs([tmp_path / "box", tmp_path / "otsu"])
    paired = paired_differences(tmp_path / "box", tmp_path / "otsu")
    by_key = {(o["dataset"], o["case"], int(o["slice"]), int(o["label"])): o for o in otsu.objects}
    diffs = [o["dsc"] - by_key[(o["dataset"], o["case"], int(o["slice"]), int(o["label"]))]["dsc"] for o in box.objects]
    assert paired["objects"] == len(box.objects) and paired["dsc"][0] == pytest.approx(np.mean(diffs), abs=1e-6)
    assert paired["dsc"][1] <= paired["dsc"][0] <= paired["dsc"][2]
    assert f"| baseline-otsu | {paired['objects']} | {paired['slices']} | {paired['dsc'][0]:+.3f}" in markdown
    _, alone = compare_runs([tmp_path / "box"])
    assert "Paired" not in alone
