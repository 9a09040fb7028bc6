"""The specialist U-Net baseline (medsam.specialist, medsam specialist-train / specialist-eval)."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from medsam.corpus import load_slice, read_manifest
from medsam.metrics import dice_score, normalized_surface_dice
from medsam.specialist import (
    ClassSet,
    SpecialistConfig,
    choose_classes,
    evaluate_specialist,
    load_specialist,
    prepare_image,
    prepare_label,
    train_specialist,
)
from medsam.specialist.data import Augment
from medsam.train.synthetic import write_synthetic_corpus

SIZE = 48
# Five levels (48 -> 3 px at the bottleneck): the synthetic ellipse (left half) and rectangle
# (right half) are told apart by position, which needs a receptive field of the whole slice.
CHANNELS = (8, 16, 32, 64, 128)


def _config(corpus, out, **kw) -> SpecialistConfig:
    base = dict(
        corpus=str(corpus),
        datasets=("synthetic_ct",),
        output=str(out),
        epochs=12,
        size=SIZE,
        batch_size=2,
        lr=1e-2,
        channels=CHANNELS,
        num_res_units=1,
        augment=False,
        seed=0,
        select="last",
    )
    base.update(kw)
    return SpecialistConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("specialist")
    corpus = write_synthetic_corpus(
        root / "corpus", cases={"train": 3, "val": 1, "test": 1}, slices_per_case=4, size=SIZE, modalities=("CT",)
    )
    result = train_specialist(_config(corpus, root / "run"))
    return corpus, result


def test_training_reduces_loss_and_fits(trained, tmp_path):
    corpus, result = trained
    assert result.steps == 12 * 6  # 12 slices, batch 2
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.5 * first, (first, last)
    assert result.classes.labels == (0, 1, 2)
    assert result.classes.names == ("background", "ellipse", "rectangle")
    ev = evaluate_specialist(corpus, result.checkpoint, tmp_path / "train_eval", split="train", plot=False)
    overall = ev.overall()
    assert overall["objects"] == 24
    assert overall["dsc_mean"] > 0.8, overall  # about 0.93-0.98 over seeds 0-3
    for name in ("objects.csv", "slices.csv", "errors.csv", "summary.csv", "summary.md", "run.json"):
        assert (tmp_path / "train_eval" / name).is_file()
    log = list(csv.DictReader(open(result.run_dir / "train_log.csv")))
    assert len(log) == 12 and all(r["val_dsc"] for r in log)
    assert (result.run_dir / "last.safetensors").is_file() and (result.run_dir / "unet.json").is_file()


def test_save_load_round_trip(trained):
    corpus, result = trained
    model = load_specialist(result.checkpoint)
    again = load_specialist(result.run_dir)  # a run folder means its unet.safetensors
    desc = json.loads((result.run_dir / "unet.json").read_text())
    assert desc["format"] == "medsam-specialist" and desc["input_size"] == SIZE
    assert desc["classes"] == {"labels": [0, 1, 2], "names": ["background", "ellipse", "rectangle"]}
    assert desc["network"]["out_channels"] == 3 and desc["datasets"] == ["synthetic_ct"]
    row = read_manifest(corpus, split="test")[0]
    image, _, _ = load_slice(corpus, row)
    a, b = model.predict_logits([image]), again.predict_logits([image])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the sidecar is not needed: the description is in the safetensors metadata
    (result.run_dir / "last.json").unlink()
    model_last = load_specialist(result.run_dir / "last.safetensors")
    assert model_last.classes == model.classes


def test_eval_rows_match_direct_metrics(trained, tmp_path):
    corpus, result = trained
    ev = evaluate_specialist(corpus, result.checkpoint, tmp_path / "test_eval", split="test", plot=False)
    model = load_specialist(result.checkpoint)
    rows = read_manifest(corpus, split="test")
    assert len(ev.objects) == len(rows) == 8 and not ev.errors
    for obj, row in zip(ev.objects, rows):
        image, label, spacing = load_slice(corpus, row)
        pred = model.predict(image)
        assert pred.shape == label.shape
        assert (obj["dataset"], obj["case"], obj["slice"], obj["label"], obj["label_name"], obj["modality"]) == (
            row.dataset,
            row.case,
            row.slice,
            row.label,
            row.label_name,
            row.modality,
        )
        assert obj["dsc"] == pytest.approx(dice_score(pred == row.label, label == row.label), abs=1e-12)
        assert obj["nsd"] == pytest.approx(
            normalized_surface_dice(pred == row.label, label == row.label, spacing, 2.0), abs=1e-12
        )
        assert obj["in_classes"] == 1
    written = list(csv.DictReader(open(tmp_path / "test_eval" / "objects.csv")))
    assert [float(r["dsc"]) for r in written] == pytest.approx([o["dsc"] for o in ev.objects], abs=1e-5)
    assert {"level", "dataset", "structure", "dsc_mean", "nsd_mean"} <= set(
        next(csv.DictReader(open(tmp_path / "test_eval" / "summary.csv"))).keys()
    )
    # comparable with `medsam benchmark` outputs
    from medsam.benchmark import compare_runs

    table, markdown = compare_runs([tmp_path / "test_eval"])
    assert "specialist-unet DSC / NSD" in markdown and table[0]["level"] == "all"


def test_label_outside_classes_scores_zero(trained, tmp_path):
    corpus, _ = trained
    rows = read_manifest(corpus, split="train")
    classes = choose_classes(rows, labels=[2])
    assert classes == ClassSet((0, 2), ("background", "rectangle"))
    with pytest.raises(ValueError, match="not present"):
        choose_classes(rows, labels=[7])
    res = train_specialist(_config(corpus, tmp_path / "run", labels=(2,), epochs=1, max_steps=1))
    assert res.steps == 1
    ev = evaluate_specialist(corpus, res.checkpoint, tmp_path / "eval", split="test", plot=False)
    ellipses = [o for o in ev.objects if o["label"] == 1]
    assert ellipses and all(o["in_classes"] == 0 and o["dsc"] == 0.0 and o["pred_area"] == 0 for o in ellipses)
    assert ev.info["objects_not_in_classes"] == len(ellipses)


def test_preprocessing():
    image = np.zeros((40, 60), np.uint8)
    image[10:30, 20:40] = 200
    image[0, 0] = 50
    x = prepare_image(image, SIZE)
    assert x.shape == (1, SIZE, SIZE) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)
    assert torch.count_nonzero(prepare_image(np.full((8, 8), 7, np.uint8), 16)) == 0
    label = np.zeros((40, 60), np.uint16)
    label[10:30, 20:40] = 300  # uint16 ids
    label[0:5, 0:5] = 9  # not a class: background
    y = prepare_label(label, ClassSet((0, 300), ("background", "big")), SIZE)
    assert y.dtype == torch.int64 and set(y.unique().tolist()) == {0, 1}


def test_augment_is_seeded():
    x = torch.rand(3, 1, 16, 16)
    y = (x > 0.5).long()
    a1, b1 = Augment()(x, y, torch.Generator().manual_seed(3))
    a2, b2 = Augment()(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert set(b1.unique().tolist()) <= {0, 1}


def test_cli(trained, tmp_path, capsys):
    from medsam.cli import main, specialist

    corpus, result = trained
    assert (
        main(
            [
                "specialist-eval",
                "--corpus",
                str(corpus),
                "--checkpoint",
                str(result.checkpoint),
                "--split",
                "test",
                "--no-plot",
                "-o",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert "specialist-unet: 8 objects" in capsys.readouterr().out
    assert (
        main(
            [
                "specialist-train",
                "--corpus",
                str(corpus),
                "--datasets",
                "synthetic_ct",
                "--epochs",
                "1",
                "--size",
                str(SIZE),
                "--channels",
                "8,16",
                "--res-units",
                "0",
                "--batch-size",
                "12",
                "--select",
                "last",
                "-o",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert (tmp_path / "run" / "unet.safetensors").is_file()
    assert (
        main(
            [
                "specialist-train",
                "--corpus",
                str(corpus),
                "--datasets",
                "nope",
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err
    # the sub-commands register on a parser as the main CLI does
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    specialist.add_parser(sub)
    assert set(sub.choices) >= {"specialist-train", "specialist-eval"}


def test_orientation_from_geometry():
    from medsam.specialist import Orientation, orientation_from_geometry

    eye = np.eye(3).tolist()
    assert orientation_from_geometry({"direction": eye}) == Orientation()
    # a NIfTI in RAS order read as LPS: x and y reversed -> both in-plane axes flipped
    ras = np.diag([-1.0, -1.0, 1.0]).tolist()
    assert orientation_from_geometry({"direction": ras}) == Orientation(False, True, True)
    # rows along x, columns along y -> transposed
    swapped = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert orientation_from_geometry({"direction": swapped}).transpose
    # coronal slices (array axis 1): rows = z, made superior-first
    assert orientation_from_geometry({"direction": eye}, slice_axis=1) == Orientation(False, True, False)
    assert orientation_from_geometry({"direction": np.eye(2).tolist()}) == Orientation()
    assert orientation_from_geometry({}) == Orientation()
    o = Orientation(True, True, False)
    a = np.arange(12).reshape(3, 4)
    back = o.inverse_torch(torch.from_numpy(np.ascontiguousarray(o.forward(a))))
    assert np.array_equal(back.numpy(), a)


def _add_mirrored_case(corpus, source_case: str, new_case: str) -> None:
    """Copy a case with every slice rotated by 180 degrees and a case.json saying so (RAS-like)."""
    rows = list(csv.DictReader(open(corpus / "manifest.csv")))
    add = []
    for r in rows:
        if r["case"] != source_case:
            continue
        with np.load(corpus / r["path"]) as d:
            image, label, spacing = d["image"], d["label"], d["spacing"]
        path = r["path"].replace(f"/{source_case}/", f"/{new_case}/")
        (corpus / path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(corpus / path, image=image[::-1, ::-1], label=label[::-1, ::-1], spacing=spacing)
        add.append({**r, "case": new_case, "path": path})
    for case, direction in ((source_case, np.eye(3)), (new_case, np.diag([-1.0, -1.0, 1.0]))):
        (corpus / "cases" / rows[0]["dataset"] / case / "case.json").write_text(
            json.dumps({"geometry": {"direction": direction.tolist()}, "slice_axis": 0})
        )
    with open(corpus / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows + add)


def test_mirrored_case_and_pixel_size(tmp_path):
    """A case stored mirrored is predicted as its twin; fixed-pixel-size framing round-trips."""
    corpus = write_synthetic_corpus(
        tmp_path / "corpus", cases={"train": 2, "val": 0, "test": 1}, slices_per_case=2, size=SIZE, modalities=("CT",)
    )
    test_case = read_manifest(corpus, split="test")[0].case
    _add_mirrored_case(corpus, test_case, "mirrored")
    # 0.8 mm slices at 1.1 mm per pixel: 48 px -> 35 px, padded to 48
    res = train_specialist(_config(corpus, tmp_path / "run", epochs=1, max_steps=2, pixel_mm=1.1))
    model = load_specialist(res.checkpoint)
    assert model.pixel_mm == pytest.approx(1.1) and model.reorient
    ev = evaluate_specialist(corpus, res.checkpoint, tmp_path / "eval", split="test", plot=False)
    by_case = {}
    for o in ev.objects:
        by_case.setdefault(o["case"], []).append(o)
    original, mirrored = by_case[test_case], by_case["mirrored"]
    assert len(original) == len(mirrored) == 4
    for a, b in zip(original, mirrored):
        assert (a["slice"], a["label"]) == (b["slice"], b["label"])
        assert a["dsc"] == pytest.approx(b["dsc"], abs=1e-9) and a["pred_area"] == b["pred_area"]
    # rows equal direct metric calls with the spacing and the orientation
    from medsam.specialist import CaseOrientations

    orient = CaseOrientations(corpus)
    rows = read_manifest(corpus, split="test")
    for obj, row in zip(ev.objects, rows):
        image, label, spacing = load_slice(corpus, row)
        pred = model.predict(image, spacing, orient(row))
        assert obj["dsc"] == pytest.approx(dice_score(pred == row.label, label == row.label), abs=1e-12)
        assert obj["nsd"] == pytest.approx(
            normalized_surface_dice(pred == row.label, label == row.label, spacing, 2.0), abs=1e-12
        )
    with pytest.raises(ValueError, match="spacing"):
        model.predict(image)  # a fixed pixel size needs the spacing
