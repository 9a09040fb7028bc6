"""Synthetic lesions (medsam.train.lesions) and their use as a training augmentation, on the
bundled real CT slice and its labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medsam.demo import samples_dir
from medsam.train.lesions import LESION_KINDS, draw_kind, paste_lesion


@pytest.fixture(scope="module")
def ct():
    image = np.asarray(Image.open(samples_dir() / "ct_slice.png"))
    labels = np.asarray(Image.open(samples_dir() / "ct_slice_label.png"))
    return image, labels


@pytest.mark.parametrize("kind", sorted(LESION_KINDS))
def test_lesions_lie_in_their_host_change_only_their_surroundings_and_keep_the_range(ct, kind):
    image, labels = ct
    H, W = image.shape
    for seed in range(4):
        lesion = paste_lesion(image, labels, np.random.default_rng(seed), kinds=[kind])
        assert lesion.kind == kind and lesion.image.dtype == image.dtype and lesion.image.shape == image.shape
        mask = lesion.mask
        assert mask[lesion.centre] and ndimage.label(mask)[1] >= 1
        assert lesion.host > 0 and (labels[mask] == lesion.host).all()  # inside the structure
        # equivalent radius within the kind's range (shrunk at most to fit its host)
        radius = np.sqrt(mask.sum() / np.pi) / min(H, W)
        assert radius <= 2.0 * LESION_KINDS[kind].radius[1]
        # far from the lesion nothing changes; values stay within the input's range
        near = ndimage.binary_dilation(mask, iterations=12)
        np.testing.assert_array_equal(lesion.image[~near], image[~near])
        assert lesion.image.min() >= image.min() and lesion.image.max() <= image.max()
        # visible: the lesion's mean moved away from its host's, darker for cysts and brighter
        # for nodules where the host leaves room on that side (else the other way)
        before, after = float(image[mask].mean()), float(lesion.image[mask].mean())
        spec = LESION_KINDS[kind]
        if spec.sign and 0 <= before + spec.sign * spec.contrast[1] * 255 <= 255:
            assert spec.sign * (after - before) > 0.05 * 255
        changed = np.abs(lesion.image[mask].astype(float) - image[mask].astype(float)).mean()
        assert changed > 0.03 * 255


def test_lesions_are_reproducible_and_vary(ct):
    image, labels = ct
    a = paste_lesion(image, labels, np.random.default_rng(7))
    b = paste_lesion(image, labels, np.random.default_rng(7))
    c = paste_lesion(image, labels, np.random.default_rng(8))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)
    kinds = {paste_lesion(image, labels, np.random.default_rng(s)).kind for s in range(12)}
    assert kinds == set(LESION_KINDS)
    # relative weights: a weight-0 kind never comes, and the kind is the first draw either way
    weighted = [paste_lesion(image, labels, np.random.default_rng(s), ["cyst", "mass"], [0.0, 2.0]) for s in range(4)]
    assert {lesion.kind for lesion in weighted} == {"mass"}
    counts = dict.fromkeys(("cyst", "mass"), 0)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        counts[draw_kind(rng, ["cyst", "mass"], [1.0, 3.0])] += 1
    assert 0.70 < counts["mass"] / 2000 < 0.80
    with pytest.raises(ValueError, match="weights"):
        draw_kind(rng, ["cyst", "mass"], [0.0, 0.0])


def test_without_labels_a_lesion_goes_into_the_body_and_float_images_work(ct):
    image, _ = ct
    values = image.astype(np.float32) * 4 - 1000  # CT-like floats
    lesion = paste_lesion(values, None, np.random.default_rng(3), kinds=["tumour"])
    assert lesion.host == 0 and lesion.image.dtype == np.float32
    assert (values[lesion.mask] > np.percentile(values, 20)).mean() > 0.5  # in tissue, not air
    small = np.random.default_rng(0).integers(0, 255, (20, 24)).astype(np.uint8)
    assert paste_lesion(small, None, np.random.default_rng(0)).mask.any()


@pytest.mark.parametrize(
    "image, kinds, match",
    [
        (np.zeros((64, 64)), ("tumour",), "constant"),
        (np.zeros((4, 64, 64)), ("tumour",), "2D slice"),
        (np.zeros((8, 64)), ("tumour",), "16 x 16"),
        (np.arange(64 * 64).reshape(64, 64), ("polyp",), "lesion kinds"),
        (np.arange(64 * 64).reshape(64, 64), (), "lesion kinds"),
    ],
)
def test_bad_inputs_are_refused(image, kinds, match):
    with pytest.raises(ValueError, match=match):
        paste_lesion(image, None, np.random.default_rng(0), kinds)


def test_training_samples_with_lesions(tmp_path):
    """lesion_prob=1: every training sample's target is a pasted lesion (its box is the lesion's
    bounding box) on a changed image; validation samples never get one; the config checks."""
    from medsam.corpus import read_manifest
    from medsam.preprocess import get_contract
    from medsam.train.config import ConfigError, TrainConfig
    from medsam.train.data import AugmentOptions, PromptOptions, SegmentationDataset
    from medsam.train.synthetic import write_synthetic_corpus

    corpus = write_synthetic_corpus(tmp_path / "corpus", {"train": 2}, slices_per_case=3, size=96)
    rows = read_manifest(corpus, "train")
    contract = get_contract("lite", 64)
    prompts = PromptOptions(jitter=0)
    cysts = AugmentOptions(lesion_prob=1.0, lesion_kinds=("cyst",))
    plain = SegmentationDataset(corpus, rows, contract, 64, prompts, AugmentOptions(), train=True, seed=1)
    lesioned = SegmentationDataset(corpus, rows, contract, 64, prompts, cysts, train=True, seed=1)
    held = SegmentationDataset(corpus, rows, contract, 64, prompts, cysts, train=False, seed=1)
    changed = 0
    for i in range(len(rows)):
        a, b, v = plain[(0, i)], lesioned[(0, i)], held[(0, i)]
        assert b["target"].any()
        changed += int(not np.array_equal(a["target"].numpy(), b["target"].numpy()))
        assert not np.array_equal(a["image"].numpy(), b["image"].numpy())
        ys, xs = np.nonzero(b["target"][0].numpy())  # the box holds the lesion (1 px: resampling)
        x0, y0, x1, y1 = b["box"].tolist()
        assert x0 <= xs.min() + 1 and y0 <= ys.min() + 1 and x1 >= xs.max() - 1 and y1 >= ys.max() - 1
        assert (x1 - x0) * (y1 - y0) < 4 * (np.ptp(xs) + 1) * (np.ptp(ys) + 1)  # and is tight to it
        np.testing.assert_array_equal(v["target"].numpy(), a["target"].numpy())
    assert changed == len(rows)
    base = {"data": {"corpus": str(corpus)}, "train": {"max_steps": 1}}
    config = TrainConfig.from_dict({**base, "data": {"corpus": str(corpus), "augment": {"lesion_prob": 0.5}}})
    assert config.data.augment.lesion_prob == 0.5
    weighted = {"lesion_kinds": ["cyst", "mass"], "lesion_weights": {"mass": 3}}
    config = TrainConfig.from_dict({**base, "data": {"corpus": str(corpus), "augment": weighted}})
    assert config.data.augment.lesion_weights_tuple() == (1.0, 3.0)
    assert TrainConfig.from_dict(base).data.augment.lesion_weights_tuple() is None
    for bad, match in (
        ({"augment": {"lesion_prob": 1.5}}, "lesion_prob"),
        ({"augment": {"lesion_kinds": ["polyp"]}}, "lesion_kinds"),
        ({"augment": {"lesion_weights": {"polyp": 2}}}, "lesion_weights"),
        ({"augment": {"lesion_weights": {"cyst": -1}}}, "lesion_weights.cyst"),
        ({"augment": {"lesion_kinds": ["cyst"], "lesion_weights": {"cyst": 0}}}, "weight 0"),
        (
            {"augment": {"lesion_prob": 0.5, "lesion_variants": 0}, "cache_embeddings": str(tmp_path / "s")},
            "lesion_variants",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict(
                {**base, "data": {"corpus": str(corpus), **bad}, "train": {"max_steps": 1, "mode": "decoder"}}
            )


def test_lesion_corpus_holds_the_lesions_of_one_split_and_benchmarks(tmp_path, capsys):
    """medsam prepare-lesions: VARIANTS copies of every slice of the split, each labelled with its
    lesion only (value by kind), reproducible from the seed; the box baseline scores it."""
    from medsam.cli import main
    from medsam.corpus import load_slice, read_manifest
    from medsam.curate.lesion_corpus import LESION_LABELS
    from medsam.train.synthetic import write_synthetic_corpus

    source = write_synthetic_corpus(tmp_path / "src", {"train": 1, "test": 2}, slices_per_case=2, size=96)
    out = tmp_path / "lesions"
    assert main(["prepare-lesions", str(source), "-o", str(out), "--variants", "2", "--seed", "9"]) == 0
    rows = read_manifest(out, "test")
    source_slices = {(r.case, r.slice) for r in read_manifest(source, "test")}
    assert len(rows) == 2 * len(source_slices)
    assert {r.dataset for r in rows} == {"synthetic_ct_lesions", "synthetic_mr_lesions"}
    for row in rows:
        image, label, _ = load_slice(out, row)
        original, _, _ = load_slice(
            source, f"cases/{row.dataset[: -len('_lesions')]}/{row.case}/slices/{row.slice // 2:04d}.npz"
        )
        assert set(np.unique(label)) == {0, row.label} and LESION_LABELS[row.label_name] == row.label
        assert not np.array_equal(image, original) and image.shape == original.shape
    again = tmp_path / "again"
    assert main(["prepare-lesions", str(source), "-o", str(again), "--variants", "2", "--seed", "9"]) == 0
    first, second = load_slice(out, rows[0]), load_slice(again, rows[0])
    np.testing.assert_array_equal(first[0], second[0])
    capsys.readouterr()
    bench = tmp_path / "bench"
    assert main(["benchmark", "--corpus", str(out), "--baseline", "box", "-o", str(bench), "--no-plot"]) == 0
    assert "tumour" in (bench / "objects.csv").read_text() or "cyst" in (bench / "objects.csv").read_text()
    assert main(["prepare-lesions", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "not a corpus" in capsys.readouterr().err
    assert main(["prepare-lesions", str(source), "-o", str(tmp_path / "y"), "--split", "val"]) == 2
    assert not (tmp_path / "y" / "manifest.csv").exists()
    one = tmp_path / "one"
    assert main(["prepare-lesions", str(source), "-o", str(one), "--datasets", "synthetic_mr", "--variants", "1"]) == 0
    assert {r.dataset for r in read_manifest(one)} == {"synthetic_mr_lesions"}
    masses = tmp_path / "masses"
    assert main(["prepare-lesions", str(source), "-o", str(masses), "--kinds", "mass", "--variants", "1"]) == 0
    assert {(r.label, r.label_name) for r in read_manifest(masses)} == {(4, "mass")}
    assert main(["prepare-lesions", str(source), "-o", str(tmp_path / "z"), "--kinds", "polyp"]) == 2
    assert "lesion kinds" in capsys.readouterr().err and not (tmp_path / "z" / "manifest.csv").exists()


def test_masses_fill_most_of_their_box_and_hold_parts_on_both_sides_of_the_host(ct):
    """A mass is the lesion a tight box nearly fills (its box alone scores a DSC near 0.9) and
    no single intensity range holds: mostly 2-3 parts, some brighter and some darker than the
    host, so a model must take the union."""
    image, labels = ct
    fills, both_sides = [], 0
    for seed in range(10):
        lesion = paste_lesion(image, labels, np.random.default_rng(seed), kinds=["mass"])
        ys, xs = np.nonzero(lesion.mask)
        fills.append(lesion.mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        assert ndimage.label(lesion.mask)[1] == 1  # one piece
        host = float(image[lesion.mask].mean())
        inner = ndimage.binary_erosion(lesion.mask, iterations=3)
        moved = lesion.image[inner].astype(float) - host
        both_sides += int((moved > 0.04 * 255).mean() > 0.1 and (moved < -0.04 * 255).mean() > 0.1)
    assert 0.75 <= np.mean(fills) <= 0.95 and min(fills) > 0.6
    # round lesions fill at most pi / 4 of their box
    tumour_fills = []
    for seed in range(10):
        mask = paste_lesion(image, labels, np.random.default_rng(seed), kinds=["cyst"]).mask
        ys, xs = np.nonzero(mask)
        tumour_fills.append(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    assert np.mean(fills) > np.mean(tumour_fills) + 0.05
    assert both_sides >= 4


def test_several_lesions_in_one_slice_keep_apart_inside_their_hosts(ct):
    from medsam.train.lesions import paste_lesions

    image, labels = ct
    kinds = ["mass", "tumour", "cyst", "nodule"]
    out, lesions = paste_lesions(image, labels, np.random.default_rng(5), kinds)
    assert out.dtype == image.dtype and lesions.dtype == np.uint8
    assert set(np.unique(lesions).tolist()) == {0, 1, 2, 3, 4}
    for k in range(1, 5):
        mask = lesions == k
        others = ndimage.binary_dilation((lesions > 0) & ~mask, iterations=2)
        assert not (mask & others).any()  # apart from the others
        assert (labels[mask] > 0).all()  # inside a labelled structure
    # the first lesion is the one paste_lesion draws alone from the same state
    first = paste_lesion(image, labels, np.random.default_rng(5), ["mass"])
    np.testing.assert_array_equal(first.mask, lesions == 1)
    with pytest.raises(ValueError, match="lesion kinds"):
        paste_lesions(image, labels, np.random.default_rng(0), ["polyp"])


def test_fundus_corpus_holds_the_two_retinal_images_with_their_field_of_view(tmp_path):
    """benchmarks/fundus_corpus.py: the modality no training image has, as a host for lesions."""
    import importlib.util
    from pathlib import Path

    from medsam.corpus import load_slice, read_manifest
    from medsam.curate.lesion_corpus import write_lesion_corpus

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fundus_corpus.py"
    spec = importlib.util.spec_from_file_location("fundus_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    corpus = tmp_path / "fundus"
    module.write_fundus_corpus(corpus)
    rows = {r.case: r for r in read_manifest(corpus, "test")}
    assert set(rows) == {"retina", "microaneurysms"} and {r.modality for r in rows.values()} == {"fundus"}
    image, fov, _ = load_slice(corpus, rows["retina"])
    assert image.shape == (512, 512) and 0.5 < fov.mean() < 0.85  # the round field of view
    assert image[fov == 1].mean() > 4 * image[fov == 0].mean()  # and not the dark surround
    small, small_fov, _ = load_slice(corpus, rows["microaneurysms"])
    assert small.shape == (102, 102) and small_fov.mean() > 0.95
    lesions = tmp_path / "lesions"
    write_lesion_corpus(corpus, lesions, variants=2, seed=1)
    for row in read_manifest(lesions, "test"):
        lesion_image, label, _ = load_slice(lesions, row)
        source, host = (image, fov) if row.case == "retina" else (small, small_fov)
        assert lesion_image.shape == source.shape and (label > 0).sum() == row.area
        assert (host[label > 0] == 1).all()  # inside the field of view
