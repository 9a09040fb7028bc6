"""The 2D predictor on the small model: batching, label maps, input handling and prompt checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medsam
from conftest import smooth_image
from medsam.predictor import PromptError
from medsam.preprocess import get_contract, to_rgb_uint8


@pytest.fixture
def predictor(tiny_model):
    p = medsam.Predictor(tiny_model)
    p.set_image(smooth_image(90, 120, seed=1))
    return p


def test_batched_boxes_equal_one_by_one(predictor):
    boxes = np.array([[10, 10, 60, 50], [40, 20, 110, 80], [0, 0, 119, 89]])
    together = predictor.predict(boxes=boxes)
    assert together.masks.shape == (3, 90, 120) and together.masks.dtype == bool
    assert together.scores.shape == (3,)
    assert together.low_res_logits.shape == (3, 1, 64, 64)
    for i, box in enumerate(boxes):
        alone = predictor.predict(boxes=box[None])
        np.testing.assert_allclose(alone.low_res_logits[0], together.low_res_logits[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alone.scores[0], together.scores[i], rtol=1e-5, atol=1e-6)


def test_multimask_shapes_and_best(predictor):
    result = predictor.predict(boxes=[[10, 10, 60, 50]], multimask=True)
    assert result.masks.shape == (1, 3, 90, 120) and result.scores.shape == (1, 3)
    best = result.best()
    assert np.array_equal(best[0], result.masks[0, result.scores[0].argmax()])


def test_mask_input_feeds_back_low_res_logits(predictor):
    first = predictor.predict(boxes=[[10, 10, 60, 50]])
    again = predictor.predict(boxes=[[10, 10, 60, 50]], mask_input=first.low_res_logits)
    assert again.masks.shape == (1, 90, 120)
    assert not np.allclose(again.low_res_logits, first.low_res_logits)


def test_label_map_gives_overlaps_to_the_highest_score(predictor):
    result = predictor.predict(boxes=[[5, 5, 80, 70], [30, 20, 115, 85], [50, 40, 100, 80]])
    labels = medsam.masks_to_label_map(result)
    assert labels.shape == (90, 120) and labels.dtype == np.uint8
    scores = np.stack([result.score_maps(i)[0] for i in range(3)])  # (3, H, W)
    thr = result.contract.threshold
    inside = scores > thr
    expected = np.where(inside.any(0), np.where(inside, scores, -np.inf).argmax(0) + 1, 0)
    assert np.array_equal(labels, expected)
    # Each label's pixels are a subset of that object's own mask.
    for i in range(3):
        assert np.all(result.masks[i][labels == i + 1])
    # Overlapping pixels exist in this setup, so the rule is actually exercised.
    assert (result.masks.sum(0) > 1).any()


def test_label_map_is_not_last_box_wins(tiny_model):
    """Two identical boxes give identical masks; the tie goes to the first, never to 'last drawn'."""
    p = medsam.Predictor(tiny_model)
    p.set_image(smooth_image(64, 64, seed=2))
    result = p.predict(boxes=[[5, 5, 50, 50], [5, 5, 50, 50]])
    labels = medsam.masks_to_label_map(result)
    assert not (labels == 2).any()


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([[10, 10, 200, 50]], "outside the image"),
        ([[-1, 10, 20, 50]], "outside the image"),
        ([[30, 10, 30, 50]], "empty"),
        ([[30, 60, 40, 50]], "empty"),
        ([[np.nan, 10, 20, 50]], "NaN"),
        ([[1, 2, 3]], r"shape \(N, 4\)"),
    ],
)
def test_bad_boxes_are_refused(predictor, boxes, message):
    with pytest.raises(PromptError, match=message):
        predictor.predict(boxes=boxes)


def test_bad_points_and_counts(predictor):
    with pytest.raises(PromptError, match="point_labels"):
        predictor.predict(points=[[10, 10]])
    with pytest.raises(PromptError, match="1 \\(foreground\\), 0 \\(background\\) or -1"):
        predictor.predict(points=[[10, 10]], point_labels=[3])
    with pytest.raises(PromptError, match="outside"):
        predictor.predict(points=[[500, 10]], point_labels=[1])
    with pytest.raises(PromptError, match="do not match"):
        predictor.predict(
            boxes=[[1, 1, 20, 20], [2, 2, 30, 30]], points=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1))
        )
    with pytest.raises(PromptError, match="at least one prompt"):
        predictor.predict()


def test_predict_before_set_image(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        medsam.Predictor(tiny_model).predict(boxes=[[1, 1, 5, 5]])


def test_image_conversion_rules():
    grey16 = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    rgb = to_rgb_uint8(grey16)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].tolist() == [[0, 64], [128, 255]]  # min-max to 0..255, rounded
    assert to_rgb_uint8(np.zeros((3, 3, 4), np.uint8)).shape == (3, 3, 3)
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 3, 3, 3)))


def test_contract_geometry_and_coordinates():
    sam = get_contract("sam", 1024)
    geom = sam.geometry((300, 420))
    assert geom.resized_size == (731, 1024)  # 300 * 1024/420 = 731.4 -> 731
    box = sam.transform_boxes(np.array([[42, 30, 420, 300]]), geom)
    np.testing.assert_allclose(box, [[42 * 1024 / 420, 30 * 731 / 300, 1024, 731]])
    med = get_contract("medsam", 1024)
    g = med.geometry((300, 420))
    np.testing.assert_allclose(med.transform_boxes(np.array([[42, 30, 420, 300]]), g), [[102.4, 102.4, 1024, 1024]])
    lite = get_contract("lite", 256)
    x, g = lite.prepare_image(np.full((100, 50), 7, np.uint8))
    assert x.shape == (1, 3, 256, 256) and g.resized_size == (256, 128)
    assert float(x[..., :, 128:].abs().max()) == 0.0  # zero padding on the right
    with pytest.raises(ValueError, match="unknown preprocessing contract"):
        get_contract("imagenet", 1024)


def test_sam_contract_normalises_with_imagenet_statistics():
    x, geom = get_contract("sam", 64).prepare_image(np.full((32, 64, 3), 200, np.uint8))
    assert geom.resized_size == (32, 64)
    expected = (200 - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    assert float(x[0, :, 32:].abs().max()) == 0.0


def test_fast_preparation_equals_the_reference_resize_on_real_slices(monkeypatch):
    """The Predictor's default image preparation (separable operators) gives the same network
    input as the contract's scikit-image resize on the bundled CT and MR slices, and the
    ``exact_preprocessing`` switch runs the reference code itself."""
    from medsam.demo import bundled_samples
    from medsam.io import read_image
    from medsam.preprocess_fast import prepare_image_fast
    from medsam.segment import to_model_input

    contract = get_contract("medsam", 1024)
    samples = [s for s in bundled_samples() if s.kind == "2d"]
    assert samples
    for sample in samples:
        pixels = to_model_input(read_image(sample.image))
        ref, g1 = contract.prepare_image(pixels)
        fast, g2 = prepare_image_fast(contract, pixels)
        assert g1 == g2
        assert torch.equal(ref, fast), sample.name
    # flat plateaus at mid grey: the resized value is an integer up to float noise there, and
    # the two operation orders may truncate it to neighbouring levels in a few pixels
    grey = np.zeros((256, 256), np.uint8)
    grey[50:200, 60:180] = 37
    grey[100:150, 100:150] = 200
    diff = (contract.prepare_image(grey)[0] - prepare_image_fast(contract, grey)[0]).abs()
    assert diff.max().item() <= 1.01 / 200 and (diff > 1e-6).float().mean().item() < 2e-3  # measured 0.12 %

    calls = []
    real = contract.prepare_image.__func__
    monkeypatch.setattr(type(contract), "prepare_image", lambda self, img: calls.append(1) or real(self, img))
    model = medsam.build_model("vit_tiny").eval()
    image = smooth_image(40, 50, seed=3)
    medsam.Predictor(model).set_image(image)
    assert model.contract == "medsam" and calls == []
    medsam.Predictor(model, exact_preprocessing=True).set_image(image)
    assert calls == [1]


def test_multimask_all_is_token_zero_then_the_three_alternatives(predictor):
    """multimask="all": one decoder pass gives the single-mask answer and the three alternatives,
    equal (float rounding apart) to the two separate calls."""
    boxes = [[10, 10, 60, 50], [5, 20, 40, 60]]
    both = predictor.predict(boxes=boxes, points=[[30, 30]], point_labels=[1], multimask="all")
    one = predictor.predict(boxes=boxes, points=[[30, 30]], point_labels=[1])
    three = predictor.predict(boxes=boxes, points=[[30, 30]], point_labels=[1], multimask=True)
    assert both.masks.shape[:2] == (2, 4) and both.scores.shape == (2, 4) and both.low_res_logits.shape[1] == 4
    np.testing.assert_allclose(both.low_res_logits[:, :1], one.low_res_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both.low_res_logits[:, 1:], three.low_res_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        both.scores, np.concatenate([one.scores[:, None], three.scores], axis=1), rtol=1e-5, atol=1e-6
    )
    assert (both.masks[:, 0] == one.masks).mean() > 0.999 and (both.masks[:, 1:] == three.masks).mean() > 0.999
    with pytest.raises(ValueError, match="multimask"):
        predictor.predict(boxes=boxes, multimask="some")
    # any true value other than "all" means the three alternatives, as before
    assert predictor.predict(boxes=boxes, multimask=np.True_).masks.shape[1] == 3
    assert predictor.predict(boxes=boxes, multimask=1).masks.shape[1] == 3
