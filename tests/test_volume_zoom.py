"""Zoom in 3D propagation (medsam.volume.segment_volume(..., zoom=...)).

A fake stands in for the network: the volume is random noise, so any image it is given (a whole
slice or a crop) can be located in the volume; a prediction is the box AND the true object, in
the image's frame. The real tiny model checks the key slice against the 2D zoom and the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam.embedding_cache import EmbeddingCache
from medsam.predictor import Predictor
from medsam.volume import Box2D, Box3D, segment_volume
from medsam.zoom import ZoomPolicy, predict_with_zoom, should_zoom, zoom_window
from test_volume import FakePrediction, FakePredictor, bbox2d, ellipsoid, zrange

S, H, W = 16, 128, 128
POLICY = ZoomPolicy(context=3.0, min_side=24, max_crop_fraction=0.5)


class LocatingPredictor(FakePredictor):
    """The propagation fake for a volume of random noise: an image (a whole slice or a crop) is
    located in the volume by its top-left 4 x 4 patch, so predictions on crops are answered in
    the crop's frame (mask = box AND truth) and every crop's window is checked against the zoom
    policy's window for the box it is asked about."""

    def __init__(self, truth, volume, policy=None, pixel=0.8):
        super().__init__(truth)
        self.volume = volume
        self.policy = policy
        self.pixel = pixel
        self.where: dict[bytes, tuple[int, int, int]] = {}
        S_, H_, W_ = volume.shape
        for s in range(S_):
            for y in range(H_ - 3):
                for x in range(W_ - 3):
                    self.where.setdefault(volume[s, y : y + 4, x : x + 4].tobytes(), (s, y, x))
        self.images: list[tuple[int, int, int, tuple]] = []  # (slice, y0, x0, shape)
        self.mask_inputs: list[bool] = []

    def set_image(self, image):
        image = np.asarray(image)
        s, y, x = self.where[image[:4, :4].tobytes()]
        np.testing.assert_array_equal(image, self.volume[s, y : y + image.shape[0], x : x + image.shape[1]])
        self.images.append((s, y, x, image.shape))
        self.set_image_calls.append(s)
        self._embedding = torch.full((1, 4, 2, 2), float(len(self.images) - 1))

    def predict(self, boxes=None, points=None, point_labels=None, mask_input=None, multimask=False, zoom=None):
        assert zoom is False  # volume walks zoom by their own policy, never inside the predictor
        s, oy, ox, (h, w) = self.images[int(round(self._embedding[0, 0, 0, 0].item()))]
        boxes = np.asarray(boxes, dtype=np.float64)
        self.predict_log.append((s, boxes + [ox, oy, ox, oy], None if mask_input is None else np.shape(mask_input)))
        self.mask_inputs.append(mask_input is not None)
        masks, maps = [], []
        for b in boxes:
            if (h, w) != self.truth.shape[1:]:
                assert (oy, oy + h, ox, ox + w) == zoom_window(
                    b + [ox, oy, ox, oy], self.truth.shape[1:], self.policy.context, self.policy.min_side
                )
            x0, y0, x1, y1 = (int(v) for v in b)
            region = np.zeros((h, w), bool)
            region[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
            m = region & self.truth[s, oy : oy + h, ox : ox + w]
            masks.append(m)
            maps.append(m.astype(np.float32) * self.pixel)
        n = len(boxes)
        return FakePrediction(np.array(masks), np.full(n, 0.9, np.float32), np.zeros((n, 1, 8, 8), np.float32), maps)


def noise_volume(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(S, H, W), dtype=np.uint8)


def two_objects():
    big = ellipsoid((8, 60, 60), (5, 40, 40), (S, H, W))
    small = ellipsoid((9, 112, 112), (4, 6, 5), (S, H, W))
    return big, small


def box3d(mask):
    (z0, z1), (x0, y0, x1, y1) = zrange(mask), bbox2d(mask.any(axis=0))
    return Box3D(int(x0), int(y0), z0, int(x1), int(y1), z1)


def test_small_boxes_are_segmented_on_their_crops_slice_by_slice():
    big, small = two_objects()
    vol = noise_volume()
    whole = LocatingPredictor(big | small, vol)
    crops = LocatingPredictor(big | small, vol, POLICY)
    res = segment_volume(
        whole, vol, [box3d(big), box3d(small)], zoom=POLICY, crop_predictor=crops, use_mask_prompt=True
    )
    assert res.zoomed == [False, True]
    np.testing.assert_array_equal(res.labels, big.astype(np.uint8) + 2 * small.astype(np.uint8))
    # the small object: every slice of its walk on a crop (windows checked by the fake), never whole
    z0, z1 = zrange(small)
    assert sorted(s for s, *_ in crops.images) == list(range(z0, z1 + 1))
    assert res.crop_embeddings_computed == len(crops.images)
    # its key-slice prompt is its 3D box, in slice coordinates once the crop offset is added back
    b = box3d(small)
    s, key_boxes, _ = crops.predict_log[0]
    assert s == (z0 + z1) // 2
    np.testing.assert_array_equal(key_boxes[0], [b.x0, b.y0, b.x1, b.y1])
    # crops never get mask prompts (their frames differ); the whole-slice object gets them after its key
    assert not any(crops.mask_inputs)
    assert whole.mask_inputs.count(False) == 1 and len(whole.mask_inputs) > 1
    # full slices are embedded for the big object's slices only, and decoded for it alone
    bz0, bz1 = zrange(big)
    assert sorted(whole.set_image_calls) == list(range(bz0, bz1 + 1))
    assert res.embeddings_computed == bz1 - bz0 + 1
    assert all(len(boxes) == 1 for _, boxes, _ in whole.predict_log)


@pytest.mark.parametrize("crop_pixel", [0.9, 0.7])
def test_overlaps_between_crop_and_whole_slice_objects_go_to_the_higher_score(crop_pixel):
    big = ellipsoid((8, 60, 60), (5, 40, 40), (S, H, W))
    small = ellipsoid((8, 60, 96), (3, 6, 6), (S, H, W))  # straddles the big object's right edge
    assert (big & small).any() and (small & ~big).any()
    vol = noise_volume(2)
    whole = LocatingPredictor(big, vol)  # its pixel score: 0.8
    crops = LocatingPredictor(small, vol, POLICY, pixel=crop_pixel)
    res = segment_volume(whole, vol, [box3d(big), box3d(small)], zoom=POLICY, crop_predictor=crops)
    assert res.zoomed == [False, True]
    expected = np.where(small & ~big, 2, 0) + np.where(big & ~small, 1, 0)
    expected[big & small] = 2 if crop_pixel > 0.8 else 1
    np.testing.assert_array_equal(res.labels, expected)


def test_a_growing_2d_prompt_leaves_its_crop_for_the_whole_slice():
    """A cone from a small cross-section on the key slice to a large one: small boxes on crops,
    then the whole slice once the box is no longer small, as 2D zoom decides box by box."""
    zz, yy, xx = np.ogrid[:S, :H, :W]
    cone = (yy - 64) ** 2 + (xx - 64) ** 2 <= (3 + 2 * zz) ** 2  # grows slower than the 3 px margin
    cone[:2] = False
    vol = noise_volume(1)
    whole = LocatingPredictor(cone, vol)
    crops = LocatingPredictor(cone, vol, POLICY)
    x0, y0, x1, y1 = bbox2d(cone[3])
    res = segment_volume(
        whole,
        vol,
        [Box2D(int(x0), int(y0), int(x1), int(y1), slice=3)],
        zoom=POLICY,
        crop_predictor=crops,
        use_mask_prompt=True,
    )
    np.testing.assert_array_equal(res.labels, cone.astype(np.uint8))
    # mask prompts only from whole slice to whole slice: not on a crop, not from one (slices 2, 4)
    assert not any(crops.mask_inputs)
    flags = {s: m for (s, _, _), m in zip(whole.predict_log, whole.mask_inputs)}
    assert flags == {s: s not in (2, 4) for s in [2, *range(4, S)]}
    # each slice's box went to a crop exactly when the policy calls it small
    calls = [(b, True) for _, boxes, _ in crops.predict_log for b in boxes]
    calls += [(b, False) for _, boxes, _ in whole.predict_log for b in boxes]
    assert {on_crop for _, on_crop in calls} == {True, False}
    assert all(should_zoom(b, (H, W), POLICY) == on_crop for b, on_crop in calls)
    assert 3 in {s for s, *_ in crops.images} and max(whole.set_image_calls) == S - 1
    assert res.zoomed == [True]
    # without zoom: the same labels, all on whole slices
    plain = segment_volume(LocatingPredictor(cone, vol), vol, [Box2D(int(x0), int(y0), int(x1), int(y1), slice=3)])
    np.testing.assert_array_equal(plain.labels, res.labels)
    assert plain.zoomed == [False] and plain.crop_embeddings_computed == 0


def test_real_model_key_slice_equals_2d_zoom_and_crops_are_cached(tiny_model, tmp_path):
    from test_volume import tiny_volume

    vol = tiny_volume()  # (6, 64, 64)
    boxes = [Box3D(30, 30, 1, 37, 38, 4), Box3D(4, 4, 0, 60, 60, 5)]
    policy = ZoomPolicy(context=3.0, min_side=16, max_crop_fraction=0.5)
    cache = EmbeddingCache(tmp_path)
    opts = dict(iou_threshold=-np.inf, zoom=policy, cache=cache)
    res = segment_volume(Predictor(tiny_model), vol, boxes, **opts)
    assert res.zoomed == [True, False]
    assert res.crop_embeddings_computed >= 1

    # the key slice of the zoomed object: exactly what the 2D zoom gives for its box
    key = (1 + 4) // 2
    pred2d = Predictor(tiny_model)
    pred2d.set_image(vol[key])
    two_d = predict_with_zoom(pred2d, vol[key], np.array([[30, 30, 37, 38]], float), policy)
    assert two_d.zoomed.tolist() == [True]
    got = res.labels[key] == 1
    # the big object's mask may take pixels where its score is higher; compare where it is absent
    free = res.labels[key] != 2
    assert (got & free).any()
    np.testing.assert_array_equal(got[free], two_d.masks[0][free])
    assert res.scores[0][key] == pytest.approx(float(two_d.scores[0]))

    rerun = segment_volume(Predictor(tiny_model), vol, boxes, **opts)
    assert rerun.crop_embeddings_computed == 0 and rerun.crop_cache_hits == res.crop_embeddings_computed
    assert rerun.embeddings_computed == 0
    np.testing.assert_array_equal(rerun.labels, res.labels)


def test_segment_file_zooms_3d_boxes_of_a_volume(tiny_model, tmp_path):
    import nibabel as nib

    from medsam.segment import segment_file
    from test_volume import tiny_volume

    vol = tiny_volume()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.eye(4)), tmp_path / "v.nii.gz")
    box = [30, 30, 1, 37, 38, 4]  # x0 y0 z0 x1 y1 z1 = i j k as the file stores them
    policy = ZoomPolicy(context=3.0, min_side=16)
    out = segment_file(
        tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", [box], model=tiny_model, zoom=policy, iou_threshold=-np.inf
    )
    assert out.extra["zoomed"] == [True] and out.extra["crop_embeddings_computed"] >= 1
    expected = segment_volume(Predictor(tiny_model), vol, [Box3D(*box)], iou_threshold=-np.inf, zoom=policy)
    written = np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(written, (expected.labels > 0).astype(np.uint8))
    # a 2D box on a key slice is zoomed too
    out2 = segment_file(
        tmp_path / "v.nii.gz", tmp_path / "m2.nii.gz", [[30, 30, 37, 38]], key_slice=2, model=tiny_model, zoom=policy
    )
    assert out2.extra["zoomed"] == [True] and out2.extra["crop_embeddings_computed"] >= 1


def test_npz_cases_take_zoom(tiny_model, tmp_path):
    from conftest import smooth_image
    from medsam.io.npz import read_npz_case
    from medsam.volume import segment_npz_case
    from test_volume import tiny_volume

    policy = ZoomPolicy(context=3.0, min_side=16)
    img = smooth_image(64, 64, seed=1, channels=3)
    boxes2d = np.array([[30, 30, 37, 38], [2, 2, 60, 60]])
    np.savez(tmp_path / "2D_case.npz", imgs=img, boxes=boxes2d)
    segs = segment_npz_case(Predictor(tiny_model), read_npz_case(tmp_path / "2D_case.npz"), zoom=policy)
    predictor = Predictor(tiny_model)
    predictor.set_image(img)
    expected = predict_with_zoom(predictor, img, boxes2d.astype(float), policy, score_maps=True)
    assert expected.zoomed.tolist() == [True, False]
    np.testing.assert_array_equal(segs, expected.label_map())

    vol = tiny_volume()
    np.savez(tmp_path / "3D_case.npz", imgs=vol, boxes=np.array([[30, 30, 1, 37, 38, 4]]), spacing=[1.0, 1.0, 2.0])
    segs3 = segment_npz_case(Predictor(tiny_model), read_npz_case(tmp_path / "3D_case.npz"), zoom=policy)
    direct = segment_volume(Predictor(tiny_model), vol, [Box3D(30, 30, 1, 37, 38, 4)], zoom=policy)
    assert direct.zoomed == [True]
    np.testing.assert_array_equal(segs3, direct.labels)
    unzoomed = segment_npz_case(Predictor(tiny_model), read_npz_case(tmp_path / "3D_case.npz"))
    assert not np.array_equal(unzoomed, segs3)  # the zoom did reach the propagation

    with pytest.raises(TypeError, match="ZoomPolicy"):
        segment_npz_case(Predictor(tiny_model), read_npz_case(tmp_path / "3D_case.npz"), zoom=3.0)
    with pytest.raises(TypeError, match="ZoomPolicy"):
        segment_npz_case(Predictor(tiny_model), read_npz_case(tmp_path / "2D_case.npz"), zoom=3.0)
    p = Predictor(tiny_model)
    with pytest.raises(ValueError, match="second predictor"):
        segment_volume(p, vol, [Box3D(30, 30, 1, 37, 38, 4)], zoom=policy, crop_predictor=p)
