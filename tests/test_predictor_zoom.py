"""The Predictor's own zoom (the model's inference recipe): small boxes on a magnified crop by
default for models of at most 256 px, with points, mask prompts, deferred and cached embeddings.

The oracle for a zoomed object is a second, non-zooming Predictor on the crop, prompts shifted by
hand, its mask pasted into an empty image (what medsam.zoom's docs define)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import smooth_image
from medsam.predictor import Predictor, masks_to_label_map
from medsam.zoom import ZoomPolicy, zoom_window

SMALL = np.array([40.0, 50.0, 52.0, 60.0])  # 13 x 11 px in a 160 x 200 image: a 39 px crop
LARGE = np.array([10.0, 10.0, 150.0, 120.0])


@pytest.fixture
def image():
    return smooth_image(160, 200, seed=3)


def on_crop(model, image, box, points=None, labels=None, mask_input=None, multimask=False):
    """The oracle: a non-zooming predictor on the default policy's crop of ``box``; returns the
    pasted masks (M, H, W), the crop's prediction and the window."""
    y0, y1, x0, x1 = zoom_window(box, image.shape[:2], 3.0, 32)
    crop = Predictor(model, zoom=False)
    crop.set_image(image[y0:y1, x0:x1].copy())
    kwargs = {"boxes": (box - [x0, y0, x0, y0])[None], "multimask": multimask}
    if points is not None:
        kwargs["points"] = (np.asarray(points, float) - [x0, y0])[None]
        kwargs["point_labels"] = np.asarray(labels)[None]
    if mask_input is not None:
        kwargs["mask_input"] = mask_input
    part = crop.predict(**kwargs)
    full = np.zeros((*part.masks.shape[1:-2], *image.shape[:2]), dtype=bool)
    full[..., y0:y1, x0:x1] = part.masks[0]
    return full, part, (y0, y1, x0, x1)


def counting():
    """``(calls, embed)``: a ``Predictor.embed`` that records each encoder call in ``calls``."""
    calls = []
    original = Predictor.embed

    def embed(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)

    return calls, embed


def test_default_zooms_small_boxes_for_256px_models(tiny_model, image):
    assert tiny_model.input_size == 256
    predictor = Predictor(tiny_model)
    assert predictor.zoom == ZoomPolicy()
    predictor.set_image(image)
    pred = predictor.predict(boxes=np.stack([SMALL, LARGE]))
    assert pred.zoomed.tolist() == [True, False]
    expected, part, window = on_crop(tiny_model, image, SMALL)
    np.testing.assert_array_equal(pred.masks[0], expected)
    assert pred.scores[0] == pytest.approx(float(part.scores[0]))
    np.testing.assert_array_equal(pred.low_res_logits[0], part.low_res_logits[0])
    assert tuple(pred.windows[0]) == window and (pred.windows[1] == -1).all()
    plain = Predictor(tiny_model, zoom=False)
    plain.set_image(image)
    whole = plain.predict(boxes=np.stack([SMALL, LARGE]))
    assert whole.windows is None and not whole.zoomed.any()
    np.testing.assert_array_equal(pred.masks[1], whole.masks[1])
    assert not np.array_equal(pred.masks[0], whole.masks[0])  # the crop changes the small mask
    # score maps: the crop's scores inside the window, the lowest score outside; masks agree
    maps = pred.score_maps(0)
    y0, y1, x0, x1 = window
    outside = np.ones(image.shape[:2], dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert (maps[:, outside] == 0).all() and (maps[:, ~outside] > 0).all()
    np.testing.assert_array_equal(maps[0] > pred.contract.threshold, pred.masks[0])
    labels = masks_to_label_map(pred)
    assert (labels[pred.masks[0] & ~pred.masks[1]] == 1).all()
    # one call's setting over the predictor's
    np.testing.assert_array_equal(predictor.predict(boxes=SMALL, zoom=False).masks[0], whole.masks[0])


def test_large_input_models_do_not_zoom_unless_asked(image):
    from medsam.model import build_model
    from medsam.model.registry import CONFIGS

    config = dataclasses.replace(CONFIGS["vit_tiny"], img_size=320, embedding_size=20)
    model = build_model(config).eval()
    assert Predictor(model).zoom is None
    predictor = Predictor(model, zoom=True)
    predictor.set_image(image)
    assert predictor.predict(boxes=SMALL).zoomed.tolist() == [True]
    with pytest.raises(ValueError, match="zoom"):
        Predictor(model, zoom="sometimes")


def test_points_shift_into_the_crop_and_a_click_outside_keeps_the_whole_image(tiny_model, image):
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    inside = [[45.0, 55.0], [41.0, 51.0]]
    pred = predictor.predict(boxes=SMALL, points=inside, point_labels=[1, 0])
    expected, _, _ = on_crop(tiny_model, image, SMALL, inside, [1, 0])
    assert pred.zoomed.tolist() == [True]
    np.testing.assert_array_equal(pred.masks[0], expected)
    # padding points (-1) do not count and are not shifted
    padded = predictor.predict(boxes=SMALL, points=[*inside, [0.0, 0.0]], point_labels=[1, 0, -1])
    assert padded.zoomed.tolist() == [True]
    outside = [[45.0, 55.0], [150.0, 140.0]]
    far = predictor.predict(boxes=SMALL, points=outside, point_labels=[1, 0])
    plain = Predictor(tiny_model, zoom=False)
    plain.set_image(image)
    assert far.zoomed.tolist() == [False]
    np.testing.assert_array_equal(far.masks, plain.predict(boxes=SMALL, points=outside, point_labels=[1, 0]).masks)


def test_a_previous_zoomed_answer_is_a_mask_prompt_in_its_crop_frame_and_multimask(tiny_model, image):
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    first = predictor.predict(boxes=SMALL)
    again = predictor.predict(boxes=SMALL, mask_input=first.low_res_logits)
    expected, _, _ = on_crop(tiny_model, image, SMALL, mask_input=first.low_res_logits)
    np.testing.assert_array_equal(again.masks[0], expected)
    multi = predictor.predict(boxes=np.stack([SMALL, LARGE]), multimask=True)
    assert multi.masks.shape == (2, 3, 160, 200) and multi.scores.shape == (2, 3)
    expected3, part3, _ = on_crop(tiny_model, image, SMALL, multimask=True)
    np.testing.assert_array_equal(multi.masks[0], expected3)
    np.testing.assert_allclose(multi.scores[0], part3.scores[0])
    assert multi.best().shape == (2, 160, 200)


def test_deferred_image_embeds_only_when_a_box_needs_it_and_crops_are_kept(tiny_model, image, monkeypatch):
    calls, embed = counting()
    monkeypatch.setattr(Predictor, "embed", embed)
    predictor = Predictor(tiny_model)
    predictor.set_image(image, defer=True)
    assert predictor.is_image_set and calls == []
    predictor.predict(boxes=SMALL)
    assert len(calls) == 1  # the crop only
    predictor.predict(boxes=SMALL)
    assert len(calls) == 1  # the crop's embedding is kept
    predictor.predict(boxes=LARGE)
    assert len(calls) == 2  # now the whole image
    predictor.predict(boxes=np.stack([SMALL, LARGE]))
    assert len(calls) == 2
    predictor.set_image(image)  # a new image forgets the crops
    assert len(calls) == 3
    predictor.predict(boxes=SMALL)
    assert len(calls) == 4


def test_an_embedding_without_pixels_is_not_zoomed(tiny_model, image):
    source = Predictor(tiny_model)
    source.set_image(image)
    bare = Predictor(tiny_model)
    bare.set_embedding(source.embedding, image.shape[:2])
    assert not bare.has_pixels and bare.predict(boxes=SMALL).zoomed.tolist() == [False]
    bare.set_embedding(source.embedding, image.shape[:2], image=image)
    np.testing.assert_array_equal(bare.predict(boxes=SMALL).masks, source.predict(boxes=SMALL).masks)
    with pytest.raises(ValueError, match="does not match"):
        bare.attach_pixels(image[:10])
