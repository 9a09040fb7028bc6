"""``medsam demo`` on the bundled samples (one sample with the real default model; the volume with
the small random model, for speed)."""

import json
import re

import numpy as np
import pytest

from medsam import demo
from medsam.default_model import bundled_checkpoint
from medsam.io import read_image
from medsam.metrics import dice_score


def test_bundled_samples_small_documented_and_consistent():
    folder = demo.samples_dir()
    files = [p for p in folder.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1.5e6
    readme = (folder / "README.md").read_text()
    assert "Apache" in readme and "pseudo-label" in readme
    samples = demo.bundled_samples()
    assert [s.name for s in samples] == ["ct_slice", "ct_lesions", "mr_slice", "ct_volume"]
    for s in samples:
        image, label = read_image(s.image), read_image(s.label)
        assert image.array.dtype == np.uint8 and image.array.shape == label.array.shape
        assert len(s.spacing) == image.array.ndim
        present = set(np.unique(label.array).tolist()) - {0}
        if s.lesions:  # the label holds the host structures; the lesions are the reference
            assert s.label_names == dict(enumerate(s.lesions, start=1)) and present
        else:
            assert present == set(s.label_names)
        names = set(s.label_names.values())
        assert set(s.structures) <= names
    vol = read_image(demo.bundled_samples(["ct_volume"])[0].image)
    assert vol.array.shape == (12, 350, 512) and vol.spacing_zyx == pytest.approx((2.0, 0.9765625, 0.9765625))
    with pytest.raises(ValueError, match="unknown demo sample"):
        demo.bundled_samples(["nope"])


def test_label_boxes():
    label = np.zeros((3, 10, 12), np.uint8)
    label[1:3, 2:5, 4:9] = 7
    assert demo.label_boxes(label, [7]) == [[4, 2, 1, 8, 4, 2]]
    assert demo.label_boxes(label[1], [7]) == [[4, 2, 8, 4]]


def test_demo_command_on_the_mr_sample_with_the_default_model(tmp_path, monkeypatch, capsys):
    from medsam.cli import main

    everything = demo.bundled_samples
    monkeypatch.setattr(demo, "bundled_samples", lambda names=None: everything(["mr_slice"]))
    assert main(["demo", "-o", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {tmp_path / 'report.md'}" in captured.out
    assert "demo results in" in captured.err
    report = (tmp_path / "report.md").read_text()
    assert "pseudo-labels" in report and "![mr_slice](mr_slice_overlay.png)" in report
    assert (tmp_path / "mr_slice_overlay.png").stat().st_size > 0
    assert json.loads((tmp_path / "mr_slice_mask.scores.json").read_text())["scores"]

    # the DSC in the report is the DSC of the written mask against the sample's label
    sample = everything(["mr_slice"])[0]
    mask = read_image(tmp_path / "mr_slice_mask.png").array
    label = read_image(sample.label).array
    by_name = {v: k for k, v in sample.label_names.items()}
    rows = re.findall(r"^\| #[0-9a-f]{6} \| (\w+) \| .* \| (\d\.\d{3}) \| (\d\.\d{3}) \|$", report, re.M)
    assert [r[0] for r in rows] == list(sample.structures)
    for n, (name, dsc, _nsd) in enumerate(rows, start=1):
        assert float(dsc) == pytest.approx(dice_score(mask == n, label == by_name[name]), abs=6e-4)
        if bundled_checkpoint() is not None:  # the trained default, not the random stand-in
            assert float(dsc) > 0.6


def test_demo_lesion_sample_is_scored_against_the_pasted_lesions(tmp_path, tiny_model):
    """The ct_lesions sample: the CT slice with a mass, a tumour, a cyst and a nodule pasted in
    (seeded, so the same every run), segmented from the lesions' boxes and scored against their
    masks; the picture and the written input image are its own."""
    from medsam.train.lesions import paste_lesions

    report = demo.run_demo(tmp_path, log=lambda m: None, samples=["ct_lesions"], model=tiny_model)
    text = report.read_text()
    sample = demo.bundled_samples(["ct_lesions"])[0]
    image = read_image(tmp_path / "ct_lesions_image.png").array
    source, hosts = read_image(sample.image).array, read_image(sample.label).array
    expected, lesions = paste_lesions(source, hosts, np.random.default_rng(2027), ["mass", "tumour", "cyst", "nodule"])
    np.testing.assert_array_equal(image, expected)
    assert set(np.unique(lesions).tolist()) == {0, 1, 2, 3, 4} and not np.array_equal(image, source)
    mask = read_image(tmp_path / "ct_lesions_mask.png").array
    rows = re.findall(r"^\| #[0-9a-f]{6} \| (\w+) \| \[(.*)\] \| .* \| (\d\.\d{3}) \| (\d\.\d{3}) \|$", text, re.M)
    assert [r[0] for r in rows] == ["mass", "tumour", "cyst", "nodule"]
    for n, (_name, box, dsc, _nsd) in enumerate(rows, start=1):
        ys, xs = np.nonzero(lesions == n)
        assert [int(v) for v in box.split(",")] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert float(dsc) == pytest.approx(dice_score(mask == n, lesions == n), abs=6e-4)
    assert "the synthetic lesions' own masks" in text and (tmp_path / "ct_lesions_overlay.png").is_file()


def test_demo_volume_path_with_a_small_model(tmp_path, tiny_model):
    report = demo.run_demo(tmp_path, log=lambda m: None, samples=["ct_volume"], model=tiny_model)
    text = report.read_text()
    assert "## ct_volume (CT, 3D)" in text and "held-out test case" in text
    mask = read_image(tmp_path / "ct_volume_mask.nii.gz")
    source = read_image(demo.bundled_samples(["ct_volume"])[0].image)
    assert mask.array.shape == source.array.shape
    assert mask.origin == pytest.approx(source.origin) and mask.spacing == pytest.approx(source.spacing)
    assert len(re.findall(r"^\| #", text, re.M)) == 3  # liver, spleen, aorta
