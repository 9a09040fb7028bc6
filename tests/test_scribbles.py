"""Scribble prompts (medsam.scribbles): sampling along strokes, the predictor and workbench API,
the simulated corrective stroke and its use in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam.predictor import Predictor, PromptError
from medsam.scribbles import (
    Scribble,
    add_scribble_points,
    merge_point_prompts,
    next_scribble,
    sample_stroke,
    scribbles_to_points,
)


def test_sample_stroke_equal_arc_length_steps():
    # an L: 30 px right, then 30 px down (length 60)
    L = np.array([[0, 0], [30, 0], [30, 30]], float)
    np.testing.assert_allclose(
        sample_stroke(L, spacing=12, max_points=8), [[0, 0], [12, 0], [24, 0], [30, 6], [30, 18], [30, 30]]
    )
    # at most max_points: 4 points at arc lengths 0, 20, 40, 60
    np.testing.assert_allclose(sample_stroke(L, spacing=12, max_points=4), [[0, 0], [20, 0], [30, 10], [30, 30]])
    # repeated vertices change nothing
    np.testing.assert_allclose(
        sample_stroke(np.array([[0, 0], [0, 0], [30, 0], [30, 0], [30, 30]], float), 12, 4),
        [[0, 0], [20, 0], [30, 10], [30, 30]],
    )
    # a stroke shorter than the spacing: its middle; a dot: itself
    np.testing.assert_allclose(sample_stroke(np.array([[2, 4], [8, 4]], float), 12, 4), [[5, 4]])
    np.testing.assert_allclose(sample_stroke(np.array([[7, 9]], float), 12, 4), [[7, 9]])
    with pytest.raises(ValueError, match="spacing"):
        sample_stroke(L, spacing=0)
    with pytest.raises(ValueError, match="max_points"):
        sample_stroke(L, max_points=0)


def test_scribble_checks_its_vertices():
    for bad in ([], [[1, 2, 3]], [[0, 0], [np.nan, 1]], [[0, np.inf]]):
        with pytest.raises(PromptError, match="scribble"):
            Scribble(np.asarray(bad, float))
    s = Scribble([[1, 2], [3, 4]], positive=False)
    assert s.vertices.dtype == np.float64 and s.vertices.shape == (2, 2)


def test_scribbles_to_points_labels_and_padding():
    pos = Scribble([[0, 0], [24, 0]])
    neg = Scribble([[5, 5]], positive=False)
    coords, labels = scribbles_to_points([pos, neg], spacing=12, max_points=4)
    np.testing.assert_allclose(coords, [[0, 0], [12, 0], [24, 0], [5, 5]])
    assert labels.tolist() == [1, 1, 1, 0]
    merged, merged_labels = merge_point_prompts([(coords, labels), (coords[:1], labels[:1])])
    assert merged.shape == (2, 4, 2) and merged_labels.tolist() == [[1, 1, 1, 0], [1, -1, -1, -1]]


def test_add_scribble_points_per_object_after_the_clicks():
    size = (50, 60)
    a = Scribble([[10, 10], [10, 34]])  # 3 points at spacing 12
    b = Scribble([[40, 20]], positive=False)
    # one object, clicks first then the stroke's points
    coords, labels = add_scribble_points([[1, 2]], [1], [a], size, spacing=12)
    np.testing.assert_allclose(coords, [[[1, 2], [10, 10], [10, 22], [10, 34]]])
    assert labels.tolist() == [[1, 1, 1, 1]]
    # two objects with their own strokes, one shared click; the shorter padded with -1
    coords, labels = add_scribble_points([[1, 2]], [0], [[a], [b]], size, spacing=12)
    assert coords.shape == (2, 4, 2)
    assert labels.tolist() == [[0, 1, 1, 1], [0, 0, -1, -1]]
    np.testing.assert_allclose(coords[1, :2], [[1, 2], [40, 20]])
    # a single Scribble is one object
    assert add_scribble_points(None, None, a, size)[0].shape[0] == 1
    with pytest.raises(PromptError, match="outside"):
        add_scribble_points(None, None, [Scribble([[10, 10], [61, 10]])], size)
    with pytest.raises(PromptError, match="counts"):
        add_scribble_points(np.zeros((3, 1, 2)), np.ones((3, 1)), [[a], [b]], size)
    with pytest.raises(PromptError, match="Scribble"):
        add_scribble_points(None, None, [[(1, 2)]], size)
    with pytest.raises(PromptError, match="point_labels"):
        add_scribble_points([[1, 2]], None, [a], size)
    # no stroke at all: the points as they were
    for empty in ([], [[]], [[], []]):
        got = add_scribble_points([[1, 2]], [1], empty, size)
        assert got == ([[1, 2]], [1])


@pytest.fixture(scope="module")
def predictor():
    from medsam.model import build_model

    torch.manual_seed(0)
    p = Predictor(build_model("vit_tiny").eval())
    rng = np.random.default_rng(0)
    p.set_image((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    return p


def test_predictor_takes_scribbles_as_the_points_along_them(predictor):
    stroke = Scribble([[10, 10], [40, 10], [40, 30]])  # length 50: 4 points at spacing 12
    box = [5, 5, 50, 40]
    got = predictor.predict(boxes=box, points=[[20, 20]], point_labels=[0], scribbles=[stroke])
    pts, labs = scribbles_to_points([stroke])
    want = predictor.predict(boxes=box, points=[np.concatenate([[[20, 20]], pts])], point_labels=[[0, *labs]])
    np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)
    np.testing.assert_array_equal(got.masks, want.masks)
    # two objects, each with its stroke, no box: 4 and 1 points, the second padded with -1
    dot = Scribble([[30, 40]])
    two = predictor.predict(scribbles=[[stroke], [dot]])
    padded = np.zeros((2, 4, 2))
    padded[0], padded[1, 0] = pts, [30, 40]
    want = predictor.predict(points=padded, point_labels=[[1, 1, 1, 1], [1, -1, -1, -1]])
    np.testing.assert_array_equal(two.low_res_logits, want.low_res_logits)
    # the padding changes the second object's prompt (SAM's "not a point" tokens take part)
    alone = predictor.predict(scribbles=[dot])
    assert not np.array_equal(alone.low_res_logits[0], two.low_res_logits[1])
    # no strokes: the box alone
    np.testing.assert_array_equal(predictor.predict(boxes=box, scribbles=[]).masks, predictor.predict(boxes=box).masks)
    with pytest.raises(PromptError, match="outside"):
        predictor.predict(boxes=box, scribbles=[Scribble([[10, 10], [70, 10]])])


def test_padding_points_need_another_prompt(predictor):
    with pytest.raises(PromptError, match="padding"):
        predictor.predict(points=[[[1, 2]], [[3, 4]]], point_labels=[[1], [-1]])
    with pytest.raises(PromptError, match="-1"):
        predictor.predict(points=[[1, 2]], point_labels=[2])
    # with a box, a padding point is accepted (SAM's "not a point")
    assert predictor.predict(boxes=[5, 5, 30, 30], points=[[1, 2]], point_labels=[-1]).masks.shape == (1, 48, 64)


def test_next_scribble_follows_the_error_region():
    gt = np.zeros((40, 80), bool)
    gt[15:22, 5:75] = True  # a 7 x 70 bar, missed entirely
    s = next_scribble(np.zeros_like(gt), gt)
    assert s is not None and s.positive
    xs, ys = s.vertices[:, 0].astype(int), s.vertices[:, 1].astype(int)
    assert gt[ys, xs].all()  # every vertex inside the missed region
    assert xs.max() - xs.min() >= 55  # along the bar, nearly end to end
    assert np.all(np.abs(ys - 18) <= 1)  # on its medial axis
    # a false blob outside the object, larger than any miss: a negative stroke inside it
    pred = gt.copy()
    pred[28:38, 20:40] = True
    s = next_scribble(pred, gt)
    assert not s.positive
    assert pred[s.vertices[:, 1].astype(int), s.vertices[:, 0].astype(int)].all()
    assert not gt[s.vertices[:, 1].astype(int), s.vertices[:, 0].astype(int)].any()
    # an L-shaped miss: the stroke bends with it (longer than either arm's straight extent)
    gt = np.zeros((60, 60), bool)
    gt[5:11, 5:55] = True
    gt[5:55, 49:55] = True
    s = next_scribble(np.zeros_like(gt), gt)
    arc = np.linalg.norm(np.diff(s.vertices, axis=0), axis=1).sum()
    assert arc > 70 and gt[s.vertices[:, 1].astype(int), s.vertices[:, 0].astype(int)].all()
    assert next_scribble(gt, gt) is None


def test_add_error_clicks_with_strokes_places_points_in_the_error():
    from medsam.clicks import add_error_clicks

    L = 32
    box = torch.zeros(2, 1, L, L, dtype=torch.bool)
    box[:, :, 4:28, 4:28] = True
    target = box.clone().to(torch.uint8)
    target[0, 0, 8:11, 6:26] = 0  # sample 0: a 3 x 20 strip the box covers wrongly
    calls = []

    def forward(boxes=None, points=None, point_labels=None, **_):
        calls.append(None if points is None else points.shape[1])
        return torch.where(box, 5.0, -5.0), torch.zeros(2, 1)  # ignores the points

    out = add_error_clicks(forward, {"boxes": torch.zeros(2, 4)}, target, rounds=2, strokes=True)
    assert calls == [None, 4]  # the second round sees the first stroke's 4 (padded) points
    assert out["points"].shape == (2, 8, 2) and out["point_labels"].shape == (2, 8)
    labels = out["point_labels"][0, :4]
    assert (labels == 0).sum() >= 2 and set(labels.tolist()) <= {0, -1}  # a negative stroke
    for (x, y), lab in zip(out["points"][0].tolist(), out["point_labels"][0].tolist()):
        if lab == 0:
            assert 8 <= y <= 10 and 6 <= x <= 25  # inside the false strip
    assert out["point_labels"][1].tolist() == [-1] * 8  # sample 1 is perfect: padding only


def test_add_error_clicks_with_strokes_maps_the_low_res_stroke_to_the_input_frame():
    """L = 16 logits against an S = 64 target: the stroke is found and sampled at L (spacing
    12 * L / S = 3 px there) and each point mapped to the input frame as (p + 0.5) * S / L - 0.5."""
    from medsam.clicks import add_error_clicks

    L, S = 16, 64
    box = torch.zeros(1, 1, L, L, dtype=torch.bool)
    box[:, :, 2:14, 2:14] = True
    target = torch.zeros(1, 1, S, S, dtype=torch.uint8)
    target[:, :, 8:56, 8:56] = 1
    target[:, :, 8:16, 8:56] = 0  # box rows 2-3 at L = 16 are not object: a 2 x 12 false strip

    def forward(**_):
        return torch.where(box, 5.0, -5.0), torch.zeros(1, 1)

    out = add_error_clicks(forward, {"boxes": torch.zeros(1, 4)}, target, rounds=1, strokes=True)
    gt = torch.nn.functional.interpolate(target.float(), size=(L, L), mode="nearest-exact").bool()[0, 0].numpy()
    stroke = next_scribble(box[0, 0].numpy(), gt)
    expected = sample_stroke(stroke.vertices, 12 * L / S, 4)
    assert not stroke.positive and len(expected) == 4  # a strip about 11 px long at L: 4 points
    got = out["points"][0].numpy()
    np.testing.assert_allclose(got, (expected + 0.5) * S / L - 0.5, rtol=0, atol=1e-5)
    assert out["point_labels"][0].tolist() == [0, 0, 0, 0]
    assert np.all((got[:, 1] >= 8) & (got[:, 1] < 16))  # inside the strip, in the 64 px frame


def test_training_config_accepts_scribbles():
    from medsam.train.config import ConfigError, TrainConfig

    base = {"model": {"arch": "vit_tiny"}, "train": {"max_steps": 1}}
    cfg = TrainConfig.from_dict({**base, "data": {"clicks": 2, "click_source": "scribbles"}})
    assert cfg.data.click_source == "scribbles"
    with pytest.raises(ConfigError, match="scribbles"):
        TrainConfig.from_dict({**base, "data": {"clicks": 0, "click_source": "scribbles"}})
