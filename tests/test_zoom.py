"""Zoomed segmentation of small boxes (medsam.zoom) and the training data that matches it
(zoom crops and corrective clicks in medsam.train.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import smooth_image
from medsam.corpus import read_manifest
from medsam.predictor import Predictor
from medsam.preprocess import get_contract
from medsam.train.config import ConfigError, TrainConfig
from medsam.train.data import AugmentOptions, PromptOptions, SegmentationDataset, clicks_for_step
from medsam.train.synthetic import write_synthetic_corpus
from medsam.zoom import ZoomPolicy, predict_with_zoom, should_zoom, zoom_window


def test_zoom_window_by_hand():
    # box 10 x 6 pixels (inclusive 20..29, 40..45): longest side 10 -> side 3 x 10 = 30,
    # centred on (x 25, y 43): x 10..40, y 28..58.
    assert zoom_window([20, 40, 29, 45], (200, 300), 3.0, 8) == (28, 58, 10, 40)
    # min_side wins for a tiny box: a 2-pixel box gets a 32-pixel window
    y0, y1, x0, x1 = zoom_window([100, 100, 101, 101], (200, 300), 3.0, 32)
    assert (y1 - y0, x1 - x0) == (32, 32) and y0 <= 100 and y1 > 101 and x0 <= 100 and x1 > 101
    # at the image corner the window is shifted inside, still square, still holding the box
    assert zoom_window([0, 0, 9, 9], (200, 300), 3.0, 8) == (0, 30, 0, 30)
    assert zoom_window([290, 190, 299, 199], (200, 300), 3.0, 8) == (170, 200, 270, 300)
    # larger than the image along an axis: clipped to the image
    assert zoom_window([0, 0, 40, 9], (50, 300), 3.0, 8) == (0, 50, 0, 123)
    # a one-pixel-wide predictor box at the last column has its far corner one past the image
    # (x1 = W): the window still lies inside the image, square, and holds the pixel
    assert zoom_window([127, 10, 128, 20], (128, 128), 3.0, 32) == (0, 33, 95, 128)


@pytest.mark.parametrize("seed", range(20))
def test_zoom_window_always_holds_the_box(seed):
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(40, 300)), int(rng.integers(40, 300))
    x0, y0 = int(rng.integers(0, W - 2)), int(rng.integers(0, H - 2))
    x1, y1 = int(rng.integers(x0 + 1, W)), int(rng.integers(y0 + 1, H))
    context = float(rng.uniform(1, 5))
    side = max(context * (max(x1 - x0, y1 - y0) + 1), 16)
    off = (float(rng.uniform(-1, 1)) * side / 2, float(rng.uniform(-1, 1)) * side / 2)
    wy0, wy1, wx0, wx1 = zoom_window([x0, y0, x1, y1], (H, W), context, 16, off)
    assert 0 <= wy0 <= y0 and y1 < wy1 <= H
    assert 0 <= wx0 <= x0 and x1 < wx1 <= W


def test_should_zoom_and_policy_checks():
    policy = ZoomPolicy(context=3.0, min_side=32, max_crop_fraction=0.5)
    assert should_zoom([100, 100, 110, 110], (512, 512), policy)  # 33-pixel crop of 512
    assert not should_zoom([100, 100, 200, 200], (512, 512), policy)  # 303 > 256
    with pytest.raises(ValueError, match="context"):
        ZoomPolicy(context=0.5)
    with pytest.raises(ValueError, match="max_crop_fraction"):
        ZoomPolicy(max_crop_fraction=0.0)


def test_predict_with_zoom_equals_crop_then_paste(tiny_model):
    """Small boxes: the mask is what the model gives on the crop, pasted back; large boxes: as
    without zoom, in one batched call on the whole image."""
    image = smooth_image(160, 200, seed=3)
    boxes = np.array([[40, 50, 52, 60], [10, 10, 150, 120], [150, 100, 158, 109]], dtype=np.float64)
    policy = ZoomPolicy(context=3.0, min_side=24, max_crop_fraction=0.5)
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    zp = predict_with_zoom(predictor, image, boxes, policy, score_maps=True)
    masks, scores, zoomed = zp.masks, zp.scores, zp.zoomed
    assert zoomed.tolist() == [True, False, True]
    # score maps agree with the masks; the label map is the masks where they do not overlap
    np.testing.assert_array_equal(zp.score_maps > zp.threshold, masks)
    labels = zp.label_map()
    alone = masks.sum(0) == 1
    for i in range(3):
        assert (labels[alone & masks[i]] == i + 1).all()
    assert (labels[masks.sum(0) == 0] == 0).all()

    whole = Predictor(tiny_model)
    whole.set_image(image)
    plain = whole.predict(boxes=boxes[1:2])
    np.testing.assert_array_equal(masks[1], plain.masks[0])
    assert scores[1] == pytest.approx(float(plain.scores[0]))

    for i in (0, 2):
        y0, y1, x0, x1 = zoom_window(boxes[i], image.shape[:2], 3.0, 24)
        crop = Predictor(tiny_model)
        crop.set_image(image[y0:y1, x0:x1].copy())
        part = crop.predict(boxes=boxes[i] - [x0, y0, x0, y0])
        expected = np.zeros(image.shape[:2], dtype=bool)
        expected[y0:y1, x0:x1] = part.masks[0]
        np.testing.assert_array_equal(masks[i], expected)
        assert scores[i] == pytest.approx(float(part.scores[0]))
    # the whole-image predictor still holds the whole image's embedding afterwards
    torch.testing.assert_close(predictor.embedding, whole.embedding)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("zoom_corpus"), {"train": 2}, slices_per_case=3, size=96)


def test_zoom_augmentation_keeps_the_whole_object_magnified(corpus):
    rows = read_manifest(corpus, "train")
    contract = get_contract("lite", 64)
    plain = SegmentationDataset(corpus, rows, contract, 64, PromptOptions(jitter=0), train=True, seed=1)
    zoomed = SegmentationDataset(
        corpus,
        rows,
        contract,
        64,
        PromptOptions(jitter=0),
        AugmentOptions(zoom_prob=1.0, zoom_context=(2.0, 2.5), zoom_min_side=8),
        train=True,
        seed=1,
    )
    grew = 0
    for i in range(len(rows)):
        a, b = plain[(0, i)], zoomed[(0, i)]
        area_a, area_b = int(a["target"].sum()), int(b["target"].sum())
        # magnified: the object covers more of the network input (or is left whole if its crop
        # would not be clearly smaller than the image)
        assert area_b >= area_a * 0.95
        grew += area_b > 1.5 * area_a
        # the box still bounds the object in the crop (nothing of it cut off at the crop edge)
        ys, xs = np.nonzero(b["target"][0].numpy())
        box = b["box"].numpy()
        scale = 64 / 20  # the crop is at least 20 px: one source pixel is at most this many
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + scale
        assert ys.min() >= box[1] - 1 and ys.max() <= box[3] + scale
    assert grew >= len(rows) // 2


def test_clicks_lie_on_the_right_side_of_the_object(corpus):
    rows = read_manifest(corpus, "train")
    contract = get_contract("lite", 96)  # 96 px corpus at 96 px: the network frame is the image
    ds = SegmentationDataset(corpus, rows, contract, 96, PromptOptions(jitter=0, clicks=4), train=True, seed=2)
    kinds = []
    for i in range(len(rows)):
        s = ds[(0, i)]
        target = s["target"][0].numpy().astype(bool)
        box = s["box"].numpy()
        for (x, y), label in zip(s["clicks"].numpy(), s["click_labels"].numpy()):
            assert target[int(round(y)), int(round(x))] == bool(label)
            assert box[0] - 2 <= x <= box[2] + 2 and box[1] - 2 <= y <= box[3] + 2
            kinds.append(int(label))
    assert 0 < sum(kinds) < len(kinds)  # both kinds drawn


def test_clicks_for_step_is_deterministic_and_mixed():
    ks = [clicks_for_step(7, step, 3, 0.5) for step in range(400)]
    assert ks == [clicks_for_step(7, step, 3, 0.5) for step in range(400)]
    assert set(ks) == {0, 1, 2, 3}
    assert 0.4 < ks.count(0) / len(ks) < 0.6
    assert all(clicks_for_step(7, s, 0, 0.5) == 0 for s in range(20))
    assert all(clicks_for_step(7, s, 3, 0.0) == 0 for s in range(20))


def test_config_checks_zoom_and_clicks():
    base = {"model": {"arch": "vit_tiny"}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="click_prob"):
        TrainConfig.from_dict({**base, "data": {"click_prob": 1.5}})
    with pytest.raises(ConfigError, match="zoom_prob"):
        TrainConfig.from_dict({**base, "data": {"augment": {"zoom_prob": -0.1}}})
    with pytest.raises(ConfigError, match="zoom_context"):
        TrainConfig.from_dict({**base, "data": {"augment": {"zoom_context": [0.5, 2.0]}}})
    cfg = TrainConfig.from_dict({**base, "data": {"clicks": 2, "augment": {"zoom_prob": 0.3}}})
    assert cfg.data.clicks == 2 and cfg.data.augment.zoom_prob == 0.3


def test_segment_file_with_zoom_writes_the_zoomed_label_map(tiny_model, tmp_path):
    from PIL import Image

    from medsam.segment import segment_file

    image = smooth_image(120, 150, seed=5)
    Image.fromarray(image).save(tmp_path / "img.png")
    boxes = [[20, 30, 30, 38], [10, 10, 140, 110]]
    policy = ZoomPolicy(context=3.0, min_side=24)
    out = segment_file(tmp_path / "img.png", tmp_path / "mask.png", boxes, model=tiny_model, zoom=policy)
    predictor = Predictor(tiny_model)
    predictor.set_image(np.asarray(Image.open(tmp_path / "img.png")))
    expected = predict_with_zoom(
        predictor, np.asarray(Image.open(tmp_path / "img.png")), np.array(boxes, float), policy, score_maps=True
    )
    assert expected.zoomed.tolist() == [True, False]
    written = np.asarray(Image.open(out.mask_path))
    np.testing.assert_array_equal(written, expected.label_map())
    np.testing.assert_allclose(out.scores, expected.scores, rtol=1e-6)


def test_auto_zoom_only_for_small_input_models_and_2d(tiny_model, tmp_path):

    from PIL import Image

    from medsam.segment import segment_file
    from medsam.zoom import resolve_zoom

    image = smooth_image(120, 150, seed=5)
    Image.fromarray(image).save(tmp_path / "img.png")
    boxes = [[20, 30, 30, 38], [10, 10, 140, 110]]
    logs: list[str] = []
    out = segment_file(
        tmp_path / "img.png", tmp_path / "mask.png", boxes, model=tiny_model, zoom="auto", log=logs.append
    )
    assert tiny_model.input_size == 256
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    expected = predict_with_zoom(predictor, image, np.array(boxes, float), ZoomPolicy(), score_maps=True)
    assert expected.zoomed.tolist() == [True, False]
    np.testing.assert_array_equal(np.asarray(Image.open(out.mask_path)), expected.label_map())
    assert any("zoom: on for this 256 px model" in m for m in logs)
    assert resolve_zoom("auto", 1024) is None  # e.g. MedSAM ViT-B
    policy = ZoomPolicy(context=2.0)
    assert resolve_zoom(policy, 1024) is policy and resolve_zoom(None, 256) is None
    assert resolve_zoom(True, 1024) == ZoomPolicy() and resolve_zoom(False, 256) is None
    with pytest.raises(ValueError, match="zoom"):
        resolve_zoom("sometimes", 256)
    with pytest.raises(TypeError, match="zoom"):
        resolve_zoom(3.0, 256)  # type: ignore[arg-type]
    for bad in ("sometimes", 3.0):
        with pytest.raises(ValueError, match="zoom"):
            segment_file(tmp_path / "img.png", tmp_path / "m2.png", boxes, model=tiny_model, zoom=bad)
