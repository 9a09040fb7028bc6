"""Memory tracking of the SAM2 family against the reference ``sam2==1.1.0`` video predictor.

A real CT volume (the bundled sample, slices 3-8 of 12, 350 x 512), two objects boxed on the key
slice from its label map, a model with seeded random weights in the MedSAM2 configuration (SAM2.1
Hiera-T at 512 px) whose object-score head is biased so that the objects are present. The
reference runs MedSAM2's 3D inference: both boxes on the key slice, propagation forward, a
reset, the same boxes, propagation backward; its hole filling is off (its CUDA kernel is not
built here), and so is ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import medsam
from conftest import rel_err
from medsam.io import read_image
from medsam.model.sam2_tracking import SAM2Tracker, fill_holes, frame_features
from medsam.tracking import track_volume
from medsam.volume import Box2D
from reference_sam2 import assert_labels_follow_logits, build_reference_medsam2_tracker

SAMPLES = medsam.__path__[0] + "/data/samples/"
KEY = 3  # of the sub-volume (slice 6 of the file)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    reference = build_reference_medsam2_tracker()
    folder = tmp_path_factory.mktemp("medsam2")
    checkpoint = folder / "MedSAM2_latest.pt"
    torch.save({"model": reference.state_dict()}, checkpoint)
    volume = read_image(SAMPLES + "ct_volume.nii.gz").array[3:9]
    labels = read_image(SAMPLES + "ct_volume_label.nii.gz").array[3:9]
    ids = [int(i) for i in np.unique(labels[KEY]) if i][:2]
    boxes = []
    for i in ids:
        ys, xs = np.nonzero(labels[KEY] == i)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
    return reference, checkpoint, volume, boxes, folder


def _reference_state(reference, volume, folder):
    """A reference video-predictor state over ``volume``'s slices prepared by our ``medsam2``
    contract (init_state reads a JPEG folder: placeholder frames, replaced by the slices)."""
    Z, H, W = volume.shape
    frames_dir = folder / "frames"
    frames_dir.mkdir(exist_ok=True)
    for z in range(Z):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames_dir / f"{z:05d}.jpg")
    contract = medsam.preprocess.get_contract("medsam2", 512)
    images = torch.cat([contract.prepare_image(volume[z])[0] for z in range(Z)])
    state = reference.init_state(str(frames_dir))
    state.update(images=images, video_height=H, video_width=W, cached_features={})
    return state


def _reference_run(reference, volume, boxes, folder):
    """MedSAM2's inference through the reference: per object and frame the video-resolution
    logits, and the forward pass's low-resolution outputs of object 1."""
    state = _reference_state(reference, volume, folder)
    video_logits: dict[tuple[int, int], torch.Tensor] = {}
    forward_low_res: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for reverse in (False, True):
            reference.reset_state(state)
            for obj_id, box in enumerate(boxes, start=1):
                reference.add_new_points_or_box(state, frame_idx=KEY, obj_id=obj_id, box=np.array(box, np.float32))
            for frame, obj_ids, logits in reference.propagate_in_video(state, reverse=reverse):
                for j, obj_id in enumerate(obj_ids):
                    video_logits[(obj_id, frame)] = logits[j, 0].clone()
            if not reverse:
                outputs = state["output_dict_per_obj"][0]
                for frame, out in {**outputs["cond_frame_outputs"], **outputs["non_cond_frame_outputs"]}.items():
                    forward_low_res[frame] = out["pred_masks"].clone()
    return video_logits, forward_low_res


def test_tracking_matches_the_reference_video_predictor(case):
    reference, checkpoint, volume, boxes, folder = case
    video_logits, forward_low_res = _reference_run(reference, volume, boxes, folder)
    model = medsam.load_model(checkpoint, device="cpu")
    assert model.config.name == "medsam2"

    # object 1 forward, step by step: low-resolution logits within 1e-4
    tracker = SAM2Tracker(model, fill_hole_area=0)
    contract = medsam.preprocess.get_contract("medsam2", 512)
    geometry = contract.geometry(volume.shape[1:])
    features = {z: frame_features(model, contract.prepare_image(volume[z])[0]) for z in range(KEY, len(volume))}
    box = contract.transform_boxes(np.array([boxes[0]], np.float64), geometry)
    with torch.inference_mode():
        track = tracker.prompt(
            features[KEY], torch.tensor(box.reshape(1, 2, 2), dtype=torch.float32), torch.tensor([[2, 3]]), KEY
        )
        ours = {KEY: track.key_output.low_res}
        for z in range(KEY + 1, len(volume)):
            ours[z] = tracker.step(track, z, features[z], len(volume)).low_res
    assert sorted(ours) == sorted(forward_low_res)
    for z, expected in forward_low_res.items():
        assert rel_err(ours[z], expected) < 1e-4, z

    # the whole volume through track_volume: each voxel to the object with the highest logit > 0
    result = track_volume(model, volume, [Box2D(*b, slice=KEY) for b in boxes], fill_hole_area=0)
    assert result.key_slices == [KEY, KEY] and result.embeddings_computed == len(volume)
    per_object = [{z: video_logits[(i + 1, z)] for z in range(len(volume))} for i in range(len(boxes))]
    assert_labels_follow_logits(result.labels, per_object)
    assert all((result.labels[z] > 0).any() for z in range(len(volume)))


def test_segment_command_tracks_with_memory(case, tmp_path):
    """``medsam segment VOLUME --box ... --slice K --checkpoint MedSAM2_latest.pt`` uses tracking."""
    import nibabel as nib

    from medsam.cli import main

    _reference, checkpoint, volume, boxes, _folder = case
    volume = volume[KEY - 1 : KEY + 2]  # three slices, the key in the middle
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.eye(4)), nifti)
    out = tmp_path / "seg.nii.gz"
    args = ["segment", str(nifti), "--box", *map(str, boxes[0]), "--slice", "1", "--checkpoint", str(checkpoint)]
    assert main([*args, "-o", str(out)]) == 0
    written = np.asarray(nib.load(out).dataobj).transpose(2, 1, 0)
    model = medsam.load_model(checkpoint, device="cpu")
    expected = track_volume(model, volume, [Box2D(*boxes[0], slice=1)]).labels
    assert (written == expected).mean() > 0.999 and expected.any()


def test_fill_holes_fills_small_background_components_only():
    logits = torch.full((1, 1, 12, 12), 5.0)
    logits[0, 0, 2:4, 2:4] = -3.0  # a 4-pixel hole
    logits[0, 0, 6:12, 6:12] = -3.0  # 36 pixels reaching the border
    filled = fill_holes(logits, 8)
    assert torch.all(filled[0, 0, 2:4, 2:4] == 0.1)
    assert torch.all(filled[0, 0, 6:12, 6:12] == -3.0)
    assert torch.equal(fill_holes(logits, 0), logits)


def test_workbench_serves_a_sam2_model(data):
    """The workbench answers 2D prompts (with candidates) from a SAM2-family model and propagates a
    saved key-slice mask through a volume by memory tracking."""
    import dataclasses

    from medsam.model.sam2 import SAM2_CONFIGS, SAM2Model
    from medsam.server import create_app
    from medsam.server.encoding import rle_decode
    from test_server import wait_job
    from workbench_fixtures import client, rle_mask

    torch.manual_seed(0)
    model = SAM2Model(dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_tiny"], img_size=256)).eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(8.0)
    with client(create_app(data, model=model)) as c:
        r = c.post("/segment", json={"image_id": "a.png", "box": [10, 10, 60, 50], "candidates": True})
        assert r.status_code == 200, r.text
        body = r.json()
        m = body["mask"]
        mask = rle_decode(m["values"], m["counts"], tuple(m["shape"]))
        assert mask.shape == (64, 80) and int(mask.sum()) == body["area"] and len(body["candidates"]) == 3
        plane = np.zeros((40, 48), np.uint8)
        plane[8:30, 10:36] = 1
        r = c.put("/labels/vol.nii.gz/slices/2", json={"mask": rle_mask(plane)}, headers={"If-Match": '"0"'})
        assert r.status_code == 200
        job = {"image_id": "vol.nii.gz", "slice_index": 2, "label": 1, "expected_version": 1, "iou_threshold": 0.0}
        result = wait_job(c, c.post("/propagate", json=job).json(), timeout=300)
        assert result["status"] == "done", result
        first, last = result["result"]["slices"]
        assert first <= 2 <= last

        # a second hand-accepted slice: both are key slices of one memory-tracked object
        r = c.put("/labels/vol.nii.gz/slices/4", json={"mask": rle_mask(plane)}, headers={"If-Match": '"2"'})
        assert r.status_code == 200
        job.update(expected_version=3, key_slices=[4], replace=True)
        result = wait_job(c, c.post("/propagate", json=job).json(), timeout=300)
        assert result["status"] == "done", result
        assert result["result"]["stop_reasons"] == ["volume_end", "volume_end"]
        labels = c.get("/labels/vol.nii.gz").json()
        assert labels["version"] == 4


def test_a_3d_box_bounds_its_tracks(case):
    from medsam.volume import Box3D

    _reference, checkpoint, volume, boxes, _folder = case
    model = medsam.load_model(checkpoint, device="cpu")
    x0, y0, x1, y1 = boxes[0]
    result = track_volume(model, volume, [Box3D(x0, y0, 2, x1, y1, 4)])
    assert result.key_slices == [3] and result.embeddings_computed == 3
    assert not result.labels[:2].any() and not result.labels[5:].any()
    assert result.labels[2:5].any() and result.stop_reasons == [("box_end", "box_end")]
    first, last = result.slices[0]
    assert 2 <= first <= 3 <= last <= 4


def test_dropping_frames_out_of_reach_changes_nothing():
    """A track keeps only the frames its next step can read (memories 6 back, pointers 15 back):
    over 20 frames the outputs equal those of a track that keeps every frame."""
    import dataclasses

    from medsam.model.sam2 import SAM2_CONFIGS, SAM2Model

    class KeepAll(dict):
        def pop(self, key, default=None):  # never forgets
            return self.get(key, default)

    torch.manual_seed(0)
    model = SAM2Model(dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_tiny"], img_size=128)).eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(8.0)
    tracker = SAM2Tracker(model, fill_hole_area=0)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        frames = [frame_features(model, torch.randn(1, 3, 128, 128, generator=g)) for _ in range(20)]
        coords, labels = torch.tensor([[[20.0, 30.0], [90.0, 100.0]]]), torch.tensor([[2, 3]])
        runs = []
        for keep_all in (False, True):
            track = tracker.prompt(frames[0], coords, labels, 0)
            if keep_all:
                track.outputs = KeepAll()
            runs.append([tracker.step(track, k, frames[k], 20).low_res for k in range(1, 20)])
            if not keep_all:
                assert len(track.outputs) == 16
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_workbench_refuses_to_fine_tune_a_sam2_model(data):
    import dataclasses

    from medsam.model.sam2 import SAM2_CONFIGS, SAM2Model
    from medsam.server import create_app
    from workbench_fixtures import client

    model = SAM2Model(dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_tiny"], img_size=128)).eval()
    with client(create_app(data, model=model)) as c:
        r = c.post("/train", json={"mode": "decoder", "steps": 5})
        assert r.status_code == 422 and "SAM2-family" in r.json()["detail"]
        assert c.get("/info").status_code == 200  # the server goes on


def test_3d_npz_case_is_tracked(case, tmp_path):
    """A CVPR 2024 3D ``.npz`` case through ``medsam segment`` with a SAM2-family model."""
    from medsam.cli import main
    from medsam.volume import Box3D

    _reference, checkpoint, volume, boxes, _folder = case
    x0, y0, x1, y1 = boxes[0]
    npz = tmp_path / "3DCT_case.npz"
    np.savez_compressed(npz, imgs=volume, boxes=np.array([[x0, y0, 2, x1, y1, 4]]), spacing=np.array([2.0, 1.0, 1.0]))
    out = tmp_path / "3DCT_case_seg.npz"
    assert main(["segment", str(npz), "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    segs = np.load(out)["segs"]
    model = medsam.load_model(checkpoint, device="cpu")
    expected = track_volume(model, volume, [Box3D(x0, y0, 2, x1, y1, 4)]).labels
    assert np.array_equal(segs, expected) and segs[2:5].any() and not segs[:2].any()


def _reference_per_object(reference, volume, folder, objects) -> list[dict[int, torch.Tensor]]:
    """MedSAM2's script per object through the reference: ``objects[i]`` is a list of
    ``(frame, add_new_points_or_box keyword arguments, or {"mask": (H, W) bool})``; the prompts,
    forward, a reset, the same prompts, backward. Returns per object the video-resolution logits
    of every frame (a prompted frame, answered by both passes, with its own mask both times)."""
    out_logits = []
    with torch.inference_mode():
        for prompts in objects:
            state = _reference_state(reference, volume, folder)
            per_frame: dict[int, torch.Tensor] = {}
            for reverse in (False, True):
                reference.reset_state(state)
                for frame, request in prompts:
                    if "mask" in request:
                        reference.add_new_mask(state, frame_idx=frame, obj_id=1, mask=request["mask"])
                    else:
                        reference.add_new_points_or_box(state, frame_idx=frame, obj_id=1, **request)
                for frame, _, out in reference.propagate_in_video(state, reverse=reverse):
                    if frame in per_frame:
                        assert frame in {f for f, _ in prompts} and torch.equal(per_frame[frame], out[0, 0])
                    per_frame[frame] = out[0, 0].clone()
            out_logits.append(per_frame)
    return out_logits


def test_several_key_slices_match_the_reference_video_predictor(case):
    """One object boxed on two slices (KeyBoxes) and one on the key slice, each run through the
    reference as MedSAM2's script runs an object (its boxes, forward, reset, the same boxes,
    backward; the reference starts both directions at the lowest prompted frame, so every frame
    is answered by one pass, a prompted one by both with its own mask)."""
    from medsam.volume import KeyBoxes

    reference, checkpoint, volume, boxes, folder = case
    labels = read_image(SAMPLES + "ct_volume_label.nii.gz").array[3:9]
    first_id = int(next(i for i in np.unique(labels[KEY]) if i))
    keys = {}
    for k in (1, 4):  # the first object drawn again two slices below the key and one above
        ys, xs = np.nonzero(labels[k] == first_id)
        keys[k] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    Z = volume.shape[0]
    objects = [
        [(k, {"box": np.array(box, np.float32)}) for k, box in keys.items()],
        [(KEY, {"box": np.array(boxes[1], np.float32)})],
    ]
    expected_logits = _reference_per_object(reference, volume, folder, objects)
    assert sorted(expected_logits[0]) == list(range(Z))

    model = medsam.load_model(checkpoint, device="cpu")
    prompts = [KeyBoxes(tuple(tuple(b) for b in keys.values()), tuple(keys)), Box2D(*boxes[1], slice=KEY)]
    result = track_volume(model, volume, prompts, fill_hole_area=0)
    assert result.key_slices == [1, KEY] and result.stop_reasons[0] == ("volume_end", "volume_end")
    assert_labels_follow_logits(result.labels, expected_logits)
    assert all((result.labels[z] == 1).any() for z in range(Z))


def test_clicks_on_a_key_slice_match_the_reference_video_predictor(case):
    """Clicks as the prompts of a track: one foreground click (SAM2 keeps the best of its three
    masks) for one object, a box with a background click inside it for the other; the reference
    gets the same through ``add_new_points_or_box(points=..., labels=..., box=...)``."""
    from medsam.volume import Clicks2D

    reference, checkpoint, volume, boxes, folder = case
    labels = read_image(SAMPLES + "ct_volume_label.nii.gz").array[3:9]
    ids = [int(i) for i in np.unique(labels[KEY]) if i][:2]
    ys, xs = np.nonzero(labels[KEY] == ids[0])
    click = (float(np.median(xs)), float(np.median(ys)))
    x0, y0, x1, y1 = boxes[1]
    inside = (float(x0 + (x1 - x0) // 4), float(y0 + (y1 - y0) // 4))
    requests = [
        {"points": np.array([click], np.float32), "labels": np.array([1], np.int32)},
        {
            "points": np.array([inside], np.float32),
            "labels": np.array([0], np.int32),
            "box": np.array(boxes[1], np.float32),
        },
    ]
    expected_logits = _reference_per_object(reference, volume, folder, [[(KEY, r)] for r in requests])

    model = medsam.load_model(checkpoint, device="cpu")
    prompts = [Clicks2D((click,), (1,), KEY), Clicks2D((inside,), (0,), KEY, box=tuple(boxes[1]))]
    result = track_volume(model, volume, prompts, fill_hole_area=0)
    assert_labels_follow_logits(result.labels, expected_logits)
    assert (result.labels[KEY] == 1).any() and (result.labels[KEY] == 2).any()


def test_a_mask_on_a_key_slice_matches_the_reference_video_predictor(case):
    """A mask as the prompt (``add_new_mask``): the key slice's result is the mask itself and the
    object is tracked from it; the other object from its box, as before."""
    from medsam.volume import Mask2D

    reference, checkpoint, volume, boxes, folder = case
    labels = read_image(SAMPLES + "ct_volume_label.nii.gz").array[3:9]
    first_id = int(next(i for i in np.unique(labels[KEY]) if i))
    mask = labels[KEY] == first_id
    objects = [[(KEY, {"mask": mask})], [(KEY, {"box": np.array(boxes[1], np.float32)})]]
    expected_logits = _reference_per_object(reference, volume, folder, objects)

    model = medsam.load_model(checkpoint, device="cpu")
    result = track_volume(model, volume, [Mask2D(mask, KEY), Box2D(*boxes[1], slice=KEY)], fill_hole_area=0)
    assert_labels_follow_logits(result.labels, expected_logits)
    own = result.labels[KEY] == 1
    assert (own == mask).mean() > 0.99  # the key slice is the mask (up to its resizing)
    assert all((result.labels[z] == 1).any() for z in range(volume.shape[0]))


def test_masks_on_several_key_slices_match_the_reference_video_predictor(case):
    """KeyMasks: the object's masks on two slices, each ``add_new_mask`` in the reference."""
    from medsam.volume import KeyMasks

    reference, checkpoint, volume, _boxes, folder = case
    labels = read_image(SAMPLES + "ct_volume_label.nii.gz").array[3:9]
    first_id = int(next(i for i in np.unique(labels[KEY]) if i))
    masks = {k: labels[k] == first_id for k in (1, 4)}
    expected_logits = _reference_per_object(reference, volume, folder, [[(k, {"mask": m}) for k, m in masks.items()]])
    model = medsam.load_model(checkpoint, device="cpu")
    result = track_volume(model, volume, [KeyMasks(tuple(masks.values()), tuple(masks))], fill_hole_area=0)
    assert_labels_follow_logits(result.labels, expected_logits)
    assert result.key_slices == [1] and all((result.labels[z] == 1).any() for z in range(volume.shape[0]))
