"""3D propagation (medsam.volume) and the slice-embedding cache (medsam.embedding_cache).

Most tests use a fake predictor standing in for the network: every slice image carries its own
index in pixel [0, 0], the fake "embedding" is a tensor filled with that index, and ``predict``
returns, for each box, the intersection of the box with the true object on that slice. So the
propagation logic, the embedding bookkeeping and the cache are tested exactly, without a model.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from medsam.embedding_cache import EmbeddingCache, model_fingerprint, set_image_cached, slice_key
from medsam.io.npz import read_npz_case
from medsam.predictor import Predictor, PromptError, masks_to_label_map
from medsam.preprocess import get_contract
from medsam.volume import Box2D, Box3D, KeyBoxes, segment_npz_case, segment_volume

S, H, W = 20, 48, 48


# ----------------------------------------------------------------------------- fakes
class FakePrediction:
    def __init__(self, masks, scores, logits, maps):
        self.masks, self.scores, self.low_res_logits, self._maps = masks, scores, logits, maps

    def score_maps(self, i):
        return self._maps[i][None]


class FakePredictor:
    """Predictor interface; mask = box (inclusive corners) AND truth[slice]."""

    def __init__(self, truth, iou=None, pixel_score=None, seed=0):
        self.truth = truth.astype(bool)
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 2)
        self.contract = get_contract("medsam", 256)
        self.iou = iou or (lambda s, box: 0.9)
        self.pixel_score = pixel_score or (lambda box: 0.8)
        self.set_image_calls: list[int] = []
        self.predict_log: list[tuple[int, np.ndarray, tuple | None]] = []
        self._embedding = None

    def set_image(self, image):
        s = int(np.asarray(image)[0, 0])
        self.set_image_calls.append(s)
        self._embedding = torch.full((1, 4, 2, 2), float(s))

    def set_embedding(self, embedding, original_size, image=None):
        assert tuple(original_size) == self.truth.shape[1:]
        self._embedding = embedding.clone()

    @property
    def embedding(self):
        return self._embedding

    def predict(self, boxes=None, points=None, point_labels=None, mask_input=None, multimask=False, zoom=None):
        assert zoom is False  # volume walks zoom by their own policy, never inside the predictor
        s = int(round(self._embedding[0, 0, 0, 0].item()))
        boxes = np.asarray(boxes, dtype=np.float64)
        self.predict_log.append((s, boxes.copy(), None if mask_input is None else np.shape(mask_input)))
        masks, scores, maps = [], [], []
        for b in boxes:
            x0, y0, x1, y1 = (int(v) for v in b)
            region = np.zeros(self.truth.shape[1:], bool)
            region[y0 : y1 + 1, x0 : x1 + 1] = True
            m = region & self.truth[s]
            masks.append(m)
            scores.append(self.iou(s, b))
            maps.append(m.astype(np.float32) * self.pixel_score(b))
        n = len(boxes)
        return FakePrediction(
            np.array(masks), np.array(scores, np.float32), np.full((n, 1, 8, 8), float(s), np.float32), maps
        )

    def predicted_slices(self):
        return [s for s, _, _ in self.predict_log]


def index_volume(shape=(S, H, W)):
    """uint8 volume whose slice s is filled with s (the fake reads it back from pixel [0, 0])."""
    return np.broadcast_to(np.arange(shape[0], dtype=np.uint8)[:, None, None], shape).copy()


def ellipsoid(center, radii, shape=(S, H, W)):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = center
    rz, ry, rx = radii
    return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def bbox2d(mask2d):
    ys, xs = np.nonzero(mask2d)
    return xs.min(), ys.min(), xs.max(), ys.max()


def zrange(mask3d):
    z = np.flatnonzero(mask3d.any(axis=(1, 2)))
    return int(z[0]), int(z[-1])


# ----------------------------------------------------------------------------- propagation
def test_walks_up_then_down_until_the_mask_vanishes():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    zmin, zmax = zrange(truth)
    fake = FakePredictor(truth)
    res = segment_volume(fake, index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)])
    np.testing.assert_array_equal(res.labels, truth.astype(np.uint8))
    assert res.labels.dtype == np.uint8
    assert res.slices == [(zmin, zmax)]
    assert res.key_slices == [10]
    assert res.stop_reasons == [("empty", "empty")]
    # key slice, up to the first empty slice, then down to the first empty slice
    assert fake.predicted_slices() == [10, *range(11, zmax + 2), *range(9, zmin - 2, -1)]
    assert sorted(res.scores[0]) == list(range(zmin, zmax + 1))
    # each propagated box is the previous mask's bbox expanded by the margin (3)
    _s, box, _ = fake.predict_log[1]
    x0, y0, x1, y1 = bbox2d(truth[10])
    np.testing.assert_array_equal(box[0], [x0 - 3, y0 - 3, x1 + 3, y1 + 3])


def test_no_fallback_to_the_key_box_on_an_empty_slice():
    # a gap on slice 13: the release re-prompted with the middle box and jumped it; we stop
    truth = ellipsoid((10, 24, 24), (8, 14, 12))
    truth[13] = False
    fake = FakePredictor(truth)
    res = segment_volume(fake, index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)])
    assert res.slices[0][1] == 12
    assert not res.labels[13:].any()
    assert max(fake.predicted_slices()) == 13


def test_stops_when_predicted_iou_falls_below_threshold():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    zmin, _ = zrange(truth)
    fake = FakePredictor(truth, iou=lambda s, box: 0.3 if s >= 13 else 0.9)
    res = segment_volume(fake, index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)], iou_threshold=0.5)
    assert res.slices == [(zmin, 12)]
    assert res.stop_reasons == [("low_iou", "empty")]
    assert not res.labels[13:].any()  # the low-IoU slice itself is discarded
    np.testing.assert_array_equal(res.labels[:13], truth[:13])
    assert 13 in fake.predicted_slices() and 14 not in fake.predicted_slices()
    # the threshold applies to propagated slices only: a low-IoU key slice is kept
    fake = FakePredictor(truth, iou=lambda s, box: 0.1)
    res = segment_volume(fake, index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)])
    assert res.slices == [(10, 10)] and res.stop_reasons == [("low_iou", "low_iou")]


def test_default_iou_stop_is_for_2d_boxes_only():
    """By default a Box2D walk stops below IoU 0.5, a Box3D walk runs through its z-range (as the
    release's 3D inference); an explicit threshold applies to both."""
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    zmin, zmax = zrange(truth)
    low = lambda s, box: 0.3 if s != 10 else 0.9
    x0, y0, x1, y1 = bbox2d(truth.any(axis=0))
    box3d = Box3D(int(x0), int(y0), zmin, int(x1), int(y1), zmax)
    res = segment_volume(FakePredictor(truth, iou=low), index_volume(), [box3d], key_slices=[10])
    assert res.slices == [(zmin, zmax)] and res.stop_reasons == [("box_end", "box_end")]
    np.testing.assert_array_equal(res.labels, truth.astype(np.uint8))
    res = segment_volume(FakePredictor(truth, iou=low), index_volume(), [box3d], key_slices=[10], iou_threshold=0.5)
    assert res.slices == [(10, 10)] and res.stop_reasons == [("low_iou", "low_iou")]
    res = segment_volume(FakePredictor(truth, iou=low), index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)])
    assert res.slices == [(10, 10)] and res.stop_reasons == [("low_iou", "low_iou")]
    res = segment_volume(
        FakePredictor(truth, iou=low), index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)], iou_threshold=0.2
    )
    assert res.slices == [(zmin, zmax)]


def test_key_boxes_each_key_walks_the_slices_nearest_to_it():
    """Keys 6 and 14: 7..10 are walked from 6 (10 is half-way: the lower key), 11..13 from 14;
    below 6 and above 14 the walks run as a Box2D's. Every slice is predicted once."""
    truth = ellipsoid((10, 24, 24), (8, 14, 12))
    zmin, zmax = zrange(truth)
    fake = FakePredictor(truth)
    prompt = KeyBoxes.from_boxes([Box2D(*bbox2d(truth[14]), slice=14), Box2D(*bbox2d(truth[6]), slice=6)])
    res = segment_volume(fake, index_volume(), [prompt])
    np.testing.assert_array_equal(res.labels, truth.astype(np.uint8))
    assert res.slices == [(zmin, zmax)] and res.key_slices == [6]
    assert res.stop_reasons == [("empty", "empty")]
    order = fake.predicted_slices()
    assert sorted(order) == list(range(zmin - 1, zmax + 2))  # once each, and one empty slice past each end
    up = order[: order.index(13)]  # the up sweep ends before the down sweep's first slice (13)
    assert up[:5] == [6, 7, 8, 9, 10] and up[5:] == list(range(14, zmax + 2))
    assert order[len(up) : len(up) + 3] == [13, 12, 11]


def test_key_boxes_do_not_stop_between_keys():
    """Between two keys the object is known to continue: no IoU stop there; beyond them the
    Box2D stop applies (default 0.5, or the explicit threshold)."""
    truth = ellipsoid((10, 24, 24), (8, 14, 12))
    low = lambda s, box: 0.9 if s in (6, 14) else 0.3
    prompt = KeyBoxes(((*bbox2d(truth[6]),), (*bbox2d(truth[14]),)), (6, 14))
    res = segment_volume(FakePredictor(truth, iou=low), index_volume(), [prompt])
    assert res.slices == [(6, 14)] and res.stop_reasons == [("low_iou", "low_iou")]
    np.testing.assert_array_equal(res.labels[6:15], truth[6:15].astype(np.uint8))
    assert not res.labels[:6].any() and not res.labels[15:].any()
    res = segment_volume(FakePredictor(truth, iou=low), index_volume(), [prompt], iou_threshold=0.2)
    np.testing.assert_array_equal(res.labels, truth.astype(np.uint8))


def test_one_key_box_is_a_box2d_and_mixes_with_other_prompts():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    other = ellipsoid((10, 10, 10), (3, 4, 4))
    both = truth | other
    one = KeyBoxes(((*bbox2d(truth[10]),),), (10,))
    box2d = Box2D(*bbox2d(truth[10]), slice=10)
    a = segment_volume(FakePredictor(truth), index_volume(), [one])
    b = segment_volume(FakePredictor(truth), index_volume(), [box2d])
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.slices, a.scores, a.stop_reasons) == (b.slices, b.scores, b.stop_reasons)
    x0, y0, x1, y1 = bbox2d(other.any(axis=0))
    z0, z1 = zrange(other)
    res = segment_volume(FakePredictor(both), index_volume(), [Box3D(x0, y0, z0, x1, y1, z1), one])
    assert set(np.unique(res.labels)) == {0, 1, 2} and len(res.slices) == 2


@pytest.mark.parametrize(
    "bad",
    [
        lambda: KeyBoxes(((1, 1, 5, 5),), (1, 2)),
        lambda: KeyBoxes(((1, 1, 5, 5), (1, 1, 5, 5)), (3, 3)),
        lambda: KeyBoxes((), ()),
        lambda: KeyBoxes(((1, 1, 5, 5), (1, 1, 5, 5)), (2.2, 2.7)),  # not whole slice indices
        lambda: segment_volume(FakePredictor(np.ones((S, H, W))), index_volume(), [KeyBoxes(((1, 1, 5, 5),), (S,))]),
        lambda: segment_volume(
            FakePredictor(np.ones((S, H, W))), index_volume(), [KeyBoxes(((1, 1, 5, 5),), (2,))], key_slices=[3]
        ),
    ],
)
def test_key_boxes_are_checked(bad):
    with pytest.raises(PromptError):
        bad()


def test_never_leaves_the_z_range_of_a_3d_box():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    x0, y0, x1, y1 = bbox2d(truth.any(axis=0))
    fake = FakePredictor(truth)
    res = segment_volume(fake, index_volume(), [Box3D(x0, y0, 7, x1, y1, 12)])
    assert res.key_slices == [9]  # (7 + 12) // 2
    assert set(fake.predicted_slices()) == set(range(7, 13))
    assert res.slices == [(7, 12)] and res.stop_reasons == [("box_end", "box_end")]
    expected = np.zeros_like(truth)
    expected[7:13] = truth[7:13]
    np.testing.assert_array_equal(res.labels, expected)
    # a key-slice override inside the range; outside it is an error
    res = segment_volume(FakePredictor(truth), index_volume(), [Box3D(x0, y0, 7, x1, y1, 12)], key_slices=[11])
    assert res.key_slices == [11] and res.slices == [(7, 12)]
    with pytest.raises(PromptError):
        segment_volume(FakePredictor(truth), index_volume(), [Box3D(x0, y0, 7, x1, y1, 12)], key_slices=[13])
    with pytest.raises(PromptError):
        segment_volume(FakePredictor(truth), index_volume(), [Box3D(x0, y0, 7, x1, y1, S)])
    with pytest.raises(PromptError):
        segment_volume(FakePredictor(truth), index_volume(), [Box3D(x1, y0, 7, x0, y1, 9)])


def test_propagated_box_stays_within_3d_box_in_plane_extent_plus_margin():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    fake = FakePredictor(truth)
    segment_volume(fake, index_volume(), [Box3D(20, 20, 5, 28, 28, 15)], box_margin=2)
    for _, boxes, _ in fake.predict_log:
        x0, y0, x1, y1 = boxes[0]
        assert x0 >= 18 and y0 >= 18 and x1 <= 30 and y1 <= 30


def test_overlaps_go_to_the_highest_score_not_the_last_object():
    a = ellipsoid((10, 24, 18), (5, 10, 9))
    b = ellipsoid((10, 24, 30), (5, 10, 9))
    truth = a | b
    box_a = Box3D(*bbox2d(a[10])[:2], 10, *bbox2d(a[10])[2:], 10)
    box_b = Box3D(*bbox2d(b[10])[:2], 10, *bbox2d(b[10])[2:], 10)

    def region(box):
        r = np.zeros((H, W), bool)
        r[box.y0 : box.y1 + 1, box.x0 : box.x1 + 1] = True
        return r & truth[10]

    ma, mb = region(box_a), region(box_b)
    both = ma & mb
    assert both.any()
    for score_a, score_b, winner in [(0.9, 0.6, 1), (0.6, 0.9, 2)]:
        fake = FakePredictor(truth, pixel_score=lambda box: score_a if box[0] < 15 else score_b)
        res = segment_volume(fake, index_volume(), [box_a, box_b])
        lab = res.labels[10]
        assert (lab[both] == winner).all()
        assert (lab[ma & ~mb] == 1).all() and (lab[mb & ~ma] == 2).all()
        assert not lab[~(ma | mb)].any()
        assert len(fake.predict_log) == 1  # both objects in one batched decoder call
    # and over a whole volume with propagation
    x0a, y0a, x1a, y1a = bbox2d(a.any(0))
    x0b, y0b, x1b, y1b = bbox2d(b.any(0))
    fake = FakePredictor(truth, pixel_score=lambda box: 0.9 if box[0] < 15 else 0.6)
    res = segment_volume(
        fake, index_volume(), [Box3D(x0a, y0a, 0, x1a, y1a, S - 1), Box3D(x0b, y0b, 0, x1b, y1b, S - 1)]
    )
    assert set(np.unique(res.labels)) == {0, 1, 2}
    assert ((res.labels > 0) == truth).all()


def three_objects():
    objs = [
        ellipsoid((5, 12, 12), (4, 8, 8)),
        ellipsoid((10, 24, 36), (4, 8, 8)),
        ellipsoid((14, 36, 12), (4, 8, 8)),
    ]
    boxes = []
    for o in objs:
        x0, y0, x1, y1 = bbox2d(o.any(axis=0))
        z0, z1 = zrange(o)
        boxes.append(Box3D(x0, y0, z0, x1, y1, z1))
    expected = np.zeros((S, H, W), np.uint8)
    for n, o in enumerate(objs):
        expected[o] = n + 1
    return objs, boxes, expected


def test_each_slice_embedded_once_for_three_objects():
    objs, boxes, expected = three_objects()
    truth = np.any(objs, axis=0)
    fake = FakePredictor(truth)
    res = segment_volume(fake, index_volume(), boxes)
    np.testing.assert_array_equal(res.labels, expected)
    calls = fake.set_image_calls
    assert len(calls) == len(set(calls)) == res.embeddings_computed
    assert set(calls) == set(range(zrange(truth)[0], zrange(truth)[1] + 1))
    assert res.memory_hits > 0  # slices between key slices were reused from memory
    # decoder calls: one per (slice, sweep), all objects on a slice batched together
    assert len(fake.predict_log) < sum(len(s) for s in res.scores)
    # without the in-memory LRU the result is the same, at the price of re-embedding
    fake0 = FakePredictor(truth)
    res0 = segment_volume(fake0, index_volume(), boxes, max_cached_slices=0)
    np.testing.assert_array_equal(res0.labels, expected)
    assert len(fake0.set_image_calls) > len(set(fake0.set_image_calls))


def test_progress_reports_monotonically_to_total():
    objs, boxes, _ = three_objects()
    calls = []
    segment_volume(
        FakePredictor(np.any(objs, axis=0)),
        index_volume(),
        boxes,
        progress=lambda done, total: calls.append((done, total)),
    )
    total = sum(b.z1 - b.z0 + 1 for b in boxes)
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] == 0


def test_mask_prompt_passes_neighbour_logits():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    fake = FakePredictor(truth)
    segment_volume(fake, index_volume(), [Box2D(*bbox2d(truth[10]), slice=10)], use_mask_prompt=True)
    assert fake.predict_log[0][2] is None  # key slice: box only
    assert all(shape == (1, 1, 8, 8) for _, _, shape in fake.predict_log[1:])


def test_non_default_axis_gives_the_transposed_result():
    objs, boxes, _ = three_objects()
    truth = np.any(objs, axis=0)
    ref = segment_volume(FakePredictor(truth), index_volume(), boxes).labels
    vol = index_volume()
    for src, axis in [(1, 1), (2, 2), (2, -1)]:
        moved = np.moveaxis(vol, 0, src)  # the slicing axis now sits at position `src`
        res = segment_volume(FakePredictor(truth), moved, boxes, axis=axis)
        assert res.labels.shape == moved.shape
        np.testing.assert_array_equal(res.labels, np.moveaxis(ref, 0, src))


def test_empty_key_slice_and_bad_prompts():
    truth = ellipsoid((10, 24, 24), (6, 14, 12))
    fake = FakePredictor(truth)
    res = segment_volume(fake, index_volume(), [Box2D(0, 0, 3, 3, slice=10)])
    assert res.slices == [None] and res.stop_reasons == [("key_empty", "key_empty")]
    assert not res.labels.any() and fake.predicted_slices() == [10]
    with pytest.raises(PromptError):
        segment_volume(fake, index_volume(), [Box2D(0, 0, W, 3, slice=1)])
    with pytest.raises(PromptError):
        segment_volume(fake, index_volume(), [[1, 2, 3, 4]])
    res = segment_volume(fake, index_volume(), [])
    assert res.labels.shape == (S, H, W) and not res.labels.any()


# ----------------------------------------------------------------------------- disk cache
def test_disk_cache_hits_on_rerun_and_ignores_other_models(tmp_path):
    objs, boxes, expected = three_objects()
    truth = np.any(objs, axis=0)
    cache = EmbeddingCache(tmp_path / "emb")
    first = FakePredictor(truth, seed=0)
    res1 = segment_volume(first, index_volume(), boxes, cache=cache)
    n = res1.embeddings_computed
    assert n > 0 and res1.cache_hits == 0 and len(cache) == n

    again = FakePredictor(truth, seed=0)  # same weights -> same fingerprint
    res2 = segment_volume(again, index_volume(), boxes, cache=EmbeddingCache(tmp_path / "emb"))
    assert again.set_image_calls == []
    assert res2.embeddings_computed == 0 and res2.cache_hits == n
    np.testing.assert_array_equal(res2.labels, expected)

    other = FakePredictor(truth, seed=1)  # other weights: every entry is stale for it
    assert model_fingerprint(other.model) != model_fingerprint(first.model)
    res3 = segment_volume(other, index_volume(), boxes, cache=EmbeddingCache(tmp_path / "emb"))
    assert res3.cache_hits == 0 and len(other.set_image_calls) == n
    np.testing.assert_array_equal(res3.labels, expected)


def test_stale_or_corrupt_entries_are_never_used(tmp_path):
    fake = FakePredictor(np.zeros((S, H, W), bool), seed=0)
    cache = EmbeddingCache(tmp_path)
    vol = index_volume()
    fp_a = model_fingerprint(fake.model)
    fp_b = model_fingerprint(torch.nn.Linear(3, 2))
    key_a = slice_key(fp_a, fake.contract, vol[4])
    key_b = slice_key(fp_b, fake.contract, vol[4])
    assert key_a != key_b
    assert key_a != slice_key(fp_a, get_contract("lite", 256), vol[4])
    assert key_a != slice_key(fp_a, get_contract("medsam", 1024), vol[4])
    assert key_a != slice_key(fp_a, fake.contract, vol[5])
    assert key_a != slice_key(fp_a, fake.contract, vol[4].astype(np.uint16))

    # an entry of another model copied under this key: rejected, deleted, recomputed
    cache.put(key_b, torch.full((1, 4, 2, 2), 99.0))
    cache.path(key_a).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache.path(key_b), cache.path(key_a))
    assert cache.get(key_a) is None and cache.rejected == 1 and key_a not in cache
    assert not set_image_cached(fake, vol[4], cache)  # miss: computed and stored
    assert fake.set_image_calls == [4] and key_a in cache
    assert set_image_cached(fake, vol[4], cache)  # hit
    assert fake.set_image_calls == [4] and fake.embedding[0, 0, 0, 0].item() == 4.0

    # a truncated file and garbage are rejected too
    data = cache.path(key_a).read_bytes()
    cache.path(key_a).write_bytes(data[: len(data) // 2])
    assert cache.get(key_a) is None
    cache.path(key_a).write_bytes(b"not a safetensors file")
    assert cache.get(key_a) is None
    cache.put(key_a, torch.full((1, 4, 2, 2), float("nan")))
    assert cache.get(key_a) is None
    assert cache.rejected == 4
    with pytest.raises(ValueError):
        cache.path("../../etc/passwd")
    cache.put(key_a, torch.zeros(1, 4, 2, 2))
    assert cache.clear() == 2 and len(cache) == 0


def test_model_fingerprint_is_memoised_and_follows_weight_changes():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    original = model.weight.detach().clone()
    fp = model_fingerprint(model)
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        model.weight.add_(1.0)  # in place: the memo notices through the version counter
    fp2 = model_fingerprint(model)
    assert fp2 != fp
    with torch.no_grad():
        model.weight.copy_(original)
    assert model_fingerprint(model) == fp
    model.load_state_dict({"weight": original + 2, "bias": model.bias.detach().clone()})
    assert model_fingerprint(model) not in (fp, fp2)
    torch.manual_seed(0)
    assert model_fingerprint(torch.nn.Linear(4, 4)) == fp  # content, not identity


# ----------------------------------------------------------------------------- real model
def tiny_volume():
    from conftest import smooth_image

    base = smooth_image(64, 64, seed=3).astype(np.int16)
    vol = np.stack([np.clip(base + 6 * z, 0, 255) for z in range(6)]).astype(np.uint8)
    return vol


def test_real_tiny_model_end_to_end(tiny_model, tmp_path):
    vol = tiny_volume()
    boxes = [Box3D(8, 10, 0, 40, 44, 5), Box2D(20, 20, 60, 60, slice=2)]
    predictor = Predictor(tiny_model)
    cache = EmbeddingCache(tmp_path)
    # random weights predict IoUs below 0: an infinite threshold lets the walk run (masks permitting)
    opts = dict(iou_threshold=-np.inf, use_mask_prompt=True)
    res = segment_volume(predictor, vol, boxes, cache=cache, **opts)
    assert res.labels.shape == vol.shape and res.labels.dtype == np.uint8
    assert set(np.unique(res.labels)) <= {0, 1, 2}
    covered = {s for rng in res.slices if rng for s in range(rng[0], rng[1] + 1)}
    assert len(covered) <= res.embeddings_computed <= vol.shape[0]
    assert len(cache) == res.embeddings_computed
    for rng, key in zip(res.slices, res.key_slices):
        assert rng is None or rng[0] <= key <= rng[1]
    # the rerun reads every embedding back and gives the same labels
    rerun = segment_volume(Predictor(tiny_model), vol, boxes, cache=cache, **opts)
    assert rerun.embeddings_computed == 0 and rerun.cache_hits == res.embeddings_computed
    np.testing.assert_array_equal(rerun.labels, res.labels)


# ----------------------------------------------------------------------------- npz cases
def test_segment_npz_case_2d_and_3d(tiny_model, tmp_path):
    from conftest import smooth_image

    img = smooth_image(64, 64, seed=1, channels=3)
    boxes2d = np.array([[5, 5, 30, 30], [20, 20, 60, 50]])
    np.savez(tmp_path / "2D_case.npz", imgs=img, boxes=boxes2d)
    case = read_npz_case(tmp_path / "2D_case.npz")
    predictor = Predictor(tiny_model)
    segs = segment_npz_case(predictor, case)
    assert segs.shape == (64, 64) and segs.dtype == np.uint8
    assert set(np.unique(segs)) <= {0, 1, 2}
    predictor.set_image(img)
    np.testing.assert_array_equal(segs, masks_to_label_map(predictor.predict(boxes=boxes2d)))

    objs, boxes, expected = three_objects()
    arr = np.array([[b.x0, b.y0, b.z0, b.x1, b.y1, b.z1] for b in boxes])
    np.savez(tmp_path / "3D_case.npz", imgs=index_volume(), boxes=arr, spacing=[0.8, 0.8, 2.5])
    case3 = read_npz_case(tmp_path / "3D_case.npz")
    segs3 = segment_npz_case(FakePredictor(np.any(objs, axis=0)), case3)
    assert segs3.dtype == np.uint8
    np.testing.assert_array_equal(segs3, expected)

    np.savez(tmp_path / "3D_empty.npz", imgs=index_volume())
    empty = segment_npz_case(FakePredictor(np.any(objs, axis=0)), read_npz_case(tmp_path / "3D_empty.npz"))
    assert empty.shape == (S, H, W) and not empty.any()
