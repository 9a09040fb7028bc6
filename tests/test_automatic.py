"""Automatic mode (medsam.automatic) against ``segment-anything==1.0``'s SamAutomaticMaskGenerator.

The oracle runs on a small SAM with seeded random weights (tests/reference_sam.py) loaded into
both implementations from one official-format checkpoint; its NMS is ONNX Runtime's operator and
its small-region clean-up OpenCV's connected components, both independent of this project.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medsam
from medsam.automatic import (
    AutoMask,
    AutoOptions,
    box_nms,
    crop_boxes,
    generate_masks,
    instance_label_map,
    point_grid,
    remove_small_regions,
)
from reference_sam import _onnxruntime_batched_nms, build_reference_small_sam, import_reference


def blobs(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: seven coloured discs on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3))
    for _ in range(7):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 40)
        img += rng.uniform(0.3, 1.0, 3) * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_sam(tmp_path_factory):
    reference = build_reference_small_sam()
    path = tmp_path_factory.mktemp("auto") / "sam_small.pth"
    torch.save(reference.state_dict(), path)
    ours = medsam.load_model(path, contract="sam")
    return reference, ours


def _compare(reference_records: list[dict], ours: list[AutoMask]) -> None:
    assert len(ours) == len(reference_records)
    for ref, mine in zip(reference_records, ours, strict=True):
        np.testing.assert_array_equal(mine.segmentation, ref["segmentation"])
        assert mine.area == ref["area"]
        assert mine.bbox == [int(v) for v in ref["bbox"]]
        assert mine.predicted_iou == pytest.approx(ref["predicted_iou"], abs=1e-4)
        assert mine.stability_score == pytest.approx(ref["stability_score"], abs=1e-3)
        assert mine.prompt == pytest.approx(ref["point_coords"][0])
        assert mine.crop_box == [int(v) for v in ref["crop_box"]]


@pytest.mark.parametrize(
    "options",
    [
        # crops and small-region clean-up: every stage of the generator
        dict(
            points_per_side=4,
            pred_iou_thresh=1.0,
            stability_score_thresh=0.02,
            crop_n_layers=1,
            min_mask_region_area=100,
        ),
        # one crop, thresholds that keep more and a looser suppression
        dict(points_per_side=6, pred_iou_thresh=0.5, stability_score_thresh=0.01, box_nms_thresh=0.5),
    ],
    ids=["crops-cleanup", "whole-image"],
)
def test_equals_reference_generator(small_sam, options):
    reference, ours = small_sam
    image = blobs(240, 320, seed=3)
    generator = import_reference().SamAutomaticMaskGenerator(reference, **options)
    expected = generator.generate(image)
    found = generate_masks(medsam.Predictor(ours, exact_preprocessing=True), image, AutoOptions(**options))
    assert len(expected) >= 4  # the case exercises suppression, not one surviving mask
    _compare(expected, found)


def test_grids_and_crops_equal_the_reference():
    import_reference()  # with the torchvision stand-in
    from segment_anything.utils import amg

    for n in (1, 4, 7, 32):
        np.testing.assert_allclose(point_grid(n), amg.build_point_grid(n))
    for size in ((300, 400), (1024, 777), (65, 1500)):
        for layers in (0, 1, 2):
            boxes, layer_ids = amg.generate_crop_boxes(size, layers, 512 / 1500)
            assert crop_boxes(size, layers, 512 / 1500) == list(zip(boxes, layer_ids, strict=True))


def test_small_region_clean_up_equals_reference():
    import_reference()  # with the torchvision stand-in; the reference's clean-up imports cv2 itself
    from segment_anything.utils import amg

    rng = np.random.default_rng(0)
    for trial in range(60):
        noisy = rng.random((40, 50)) < rng.uniform(0.2, 0.8)
        for mode in ("holes", "islands"):
            for area in (1, 3, 20, 5000):
                expected, changed = amg.remove_small_regions(noisy, area, mode)
                mine, mine_changed = remove_small_regions(noisy, area, mode)
                assert mine_changed == changed, (trial, mode, area)
                np.testing.assert_array_equal(mine, expected)


def test_box_nms_equals_onnxruntime():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        corner = rng.integers(0, 50, (n, 2))
        boxes = np.concatenate([corner, corner + rng.integers(0, 30, (n, 2))], axis=1).astype(np.float32)
        # ties (0 / 1 scores, as after clean-up) keep the earlier box
        scores = rng.choice([0.0, 1.0], n) if trial % 2 else rng.random(n)
        threshold = float(rng.choice([0.3, 0.5, 0.7]))
        expected = _onnxruntime_batched_nms(
            torch.as_tensor(boxes), torch.as_tensor(scores, dtype=torch.float32), torch.zeros(n), threshold
        )
        np.testing.assert_array_equal(box_nms(boxes, scores, threshold), expected.numpy())


def _auto_mask(mask: np.ndarray) -> AutoMask:
    return AutoMask(mask, int(mask.sum()), [0, 0, 0, 0], 1.0, 1.0, [0.0, 0.0], [0, 0, 4, 4])


def test_instance_label_map_puts_parts_on_top():
    whole = np.zeros((4, 4), bool)
    whole[:3, :3] = True
    part = np.zeros((4, 4), bool)
    part[1, 1] = True
    elsewhere = np.zeros((4, 4), bool)
    elsewhere[3, 3] = True
    labels = instance_label_map([_auto_mask(part), _auto_mask(whole), _auto_mask(elsewhere)], (4, 4))
    assert labels[1, 1] == 1 and labels[0, 0] == 2 and labels[3, 3] == 3 and labels[3, 0] == 0
    assert labels.dtype == np.uint8
    assert instance_label_map([_auto_mask(part)] * 256, (4, 4)).dtype == np.uint16


@pytest.mark.parametrize(
    "bad",
    [
        dict(points_per_side=0),
        dict(box_nms_thresh=1.5),
        dict(stability_score_offset=-1),
        dict(prompt="scribbles"),
        dict(box_sizes=()),
        dict(box_sizes=(0.0,)),
        dict(pred_iou_thresh=float("nan")),
        dict(crop_n_layers=-1),
    ],
)
def test_options_are_checked(bad):
    with pytest.raises(ValueError):
        AutoOptions(**bad)


def test_box_prompts_on_the_default_model():
    """MedSAM-style models are asked with boxes; each kept mask agrees with the box that asked."""
    from medsam.demo import samples_dir
    from medsam.io import read_image

    image = read_image(samples_dir() / "ct_slice.png").array
    predictor = medsam.Predictor(medsam.load_model())
    options = AutoOptions(box_agreement_thresh=0.6).resolved("boxes")
    assert (options.pred_iou_thresh, options.stability_score_thresh, options.box_nms_thresh) == (0.7, 0.8, 0.5)
    found = generate_masks(predictor, image, options)
    assert found, "no object proposed on the CT slice"
    for m in found:
        assert m.box_agreement is not None and m.box_agreement >= 0.6
        assert len(m.prompt) == 4 and m.predicted_iou > options.pred_iou_thresh
        assert m.area == int(m.segmentation.sum()) > 0
    boxes = np.array([[m.bbox[0], m.bbox[1], m.bbox[0] + m.bbox[2], m.bbox[1] + m.bbox[3]] for m in found])
    kept = box_nms(boxes, np.array([m.predicted_iou for m in found]), options.box_nms_thresh)
    assert sorted(kept.tolist()) == list(range(len(found)))  # nothing left to suppress


def test_cli_auto_writes_the_instance_map_and_scores(small_sam, tmp_path, capsys):
    import json

    from PIL import Image

    from medsam.cli import main

    _, ours = small_sam
    checkpoint = tmp_path / "sam_small.pth"
    torch.save(build_reference_small_sam().state_dict(), checkpoint)
    image = blobs(120, 160, seed=5)
    png = tmp_path / "blobs.png"
    Image.fromarray(image).save(png)
    flags = ["--points-per-side", "4", "--pred-iou-thresh", "1.0", "--stability-thresh", "0.02"]
    out = tmp_path / "auto.png"
    common = ["segment", str(png), "--checkpoint", str(checkpoint), "--contract", "sam"]
    assert main([*common, "--auto", *flags, "-o", str(out)]) == 0
    options = AutoOptions(points_per_side=4, pred_iou_thresh=1.0, stability_score_thresh=0.02)
    expected = generate_masks(medsam.Predictor(ours), image, options)
    assert expected
    np.testing.assert_array_equal(np.asarray(Image.open(out)), instance_label_map(expected, image.shape[:2]))
    report = json.loads((tmp_path / "auto.scores.json").read_text())
    assert report["mode"] == "auto" and [o["label"] for o in report["objects"]] == list(range(1, len(expected) + 1))
    assert [o["bbox"] for o in report["objects"]] == [m.bbox for m in expected]

    capsys.readouterr()
    assert main([*common, "--auto", "--box", "1", "1", "9", "9", "-o", str(tmp_path / "x.png")]) == 2
    assert main([*common, "--auto", "--stability-thresh", "nan", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "give either --box or --auto" in err[0] and len(err) == 2
    assert not (tmp_path / "x.png").exists()


def test_auto_on_a_volume_propagates_the_key_slice_objects(small_sam, tmp_path):
    import nibabel as nib

    from medsam.segment import segment_file

    _, ours = small_sam
    slices = np.stack([blobs(96, 128, seed=7)[..., 0]] * 5)  # (Z, Y, X) uint8
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(slices.transpose(2, 1, 0)), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    options = AutoOptions(points_per_side=4, pred_iou_thresh=1.0, stability_score_thresh=0.02)
    out = segment_file(path, tmp_path / "labels.nii.gz", [], model=ours, auto=options, key_slice=2)
    key_objects = generate_masks(medsam.Predictor(ours), slices[2], options)
    assert out.extra["key_slice"] == 2 and len(out.extra["objects"]) == len(key_objects) > 0
    written = nib.load(tmp_path / "labels.nii.gz")
    np.testing.assert_allclose(written.affine, np.diag([0.8, 0.8, 2.0, 1.0]))
    labels = np.asarray(written.dataobj).transpose(2, 1, 0)
    assert labels.shape == slices.shape and labels[2].any()
    assert set(np.unique(labels)) <= set(range(len(key_objects) + 1))
    with pytest.raises(ValueError, match="either boxes or auto"):
        segment_file(path, tmp_path / "l2.nii.gz", [[1, 1, 9, 9]], model=ours, auto=options, key_slice=2)


def test_proposals_are_outlined_by_the_model(tmp_path):
    """Each connected piece of a proposal label map becomes one box prompt (2D), or one 3D box
    (volumes), answered exactly as an explicit box prompt is."""
    from scipy import ndimage

    from medsam.automatic import refine_proposals
    from medsam.demo import samples_dir
    from medsam.io import read_image
    from medsam.segment import segment_file
    from medsam.volume import Box3D, segment_volume

    model = medsam.load_model()
    image = read_image(samples_dir() / "ct_slice.png").array
    proposals = read_image(samples_dir() / "ct_slice_label.png").array
    found = refine_proposals(medsam.Predictor(model), image, proposals, min_area=50)
    boxes, ids = [], []
    for value in np.unique(proposals)[1:]:
        pieces, count = ndimage.label(proposals == value, structure=np.ones((3, 3)))
        for index in range(1, count + 1):
            rows, cols = np.nonzero(pieces == index)
            if rows.size >= 50:
                boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
                ids.append(int(value))
    assert len(found) == len(boxes) > 5
    predictor = medsam.Predictor(model, zoom=False)  # automatic mode outlines on the whole slice
    predictor.set_image(image)
    expected = predictor.predict(boxes=np.asarray(boxes, dtype=float))
    order = sorted(range(len(boxes)), key=lambda i: (ids[i], -int((expected.masks[i]).sum())))
    by_prompt = {tuple(m.prompt): m for m in found}
    for i in order:
        mine = by_prompt[tuple(float(v) for v in boxes[i])]
        assert mine.proposal_label == ids[i]
        np.testing.assert_array_equal(mine.segmentation, expected.masks[i])
        assert mine.predicted_iou == pytest.approx(float(expected.scores[i]))
    with pytest.raises(ValueError, match="do not match"):
        refine_proposals(predictor, image, proposals[:-1])

    # a volume: one Box3D per 3D piece of each label
    volume = samples_dir() / "ct_volume.nii.gz"
    label_file = samples_dir() / "ct_volume_label.nii.gz"
    pixels = read_image(volume).array
    labels = read_image(label_file).array
    values, counts = np.unique(labels, return_counts=True)
    largest = values[1:][np.argsort(-counts[1:])][:3]
    labels = np.where(np.isin(labels, largest), labels, 0)  # three structures keep the test short
    out = segment_file(volume, tmp_path / "auto.nii.gz", [], model=model, auto=AutoOptions(), proposals=labels)
    prompts = [Box3D(*o["box"]) for o in out.extra["objects"]]
    assert len(prompts) >= 3 and {o["proposal_label"] for o in out.extra["objects"]} == set(largest.tolist())
    for o in out.extra["objects"]:
        x0, y0, z0, x1, y1, z1 = o["box"]
        piece = labels[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] == o["proposal_label"]
        assert piece[[0, -1]].any() and piece[:, [0, -1]].any() and piece[..., [0, -1]].any()  # tight
    expected_labels = segment_volume(medsam.Predictor(model), pixels, prompts).labels
    np.testing.assert_array_equal(out.labels, expected_labels)
    with pytest.raises(ValueError, match="differs from the image"):
        segment_file(volume, tmp_path / "x.nii.gz", [], model=model, auto=AutoOptions(), proposals=labels[:, :-1])
    with pytest.raises(ValueError, match="pass auto too"):
        segment_file(volume, tmp_path / "x.nii.gz", [[1, 1, 1, 5, 5, 5]], model=model, proposals=label_file)
    assert not (tmp_path / "x.nii.gz").exists()
    # the CLI reads proposals from a file
    from medsam.cli import main

    out_png = tmp_path / "refined.png"
    assert (
        main(
            [
                "segment",
                str(samples_dir() / "ct_slice.png"),
                "--auto",
                "--proposals",
                str(samples_dir() / "ct_slice_label.png"),
                "-o",
                str(out_png),
            ]
        )
        == 0
    )
    report = __import__("json").loads((tmp_path / "refined.scores.json").read_text())
    assert report["proposals"].endswith("ct_slice_label.png") and len(report["objects"]) >= len(found)
    assert main(["segment", str(samples_dir() / "ct_slice.png"), "--proposals", "x.png", "-o", str(out_png)]) == 2
    assert not (tmp_path / "x.nii.gz").exists()


def test_progress_reports_each_embedding_and_batch_and_can_stop_the_work(small_sam):
    _, ours = small_sam
    image = blobs(120, 160, seed=1)
    calls: list[tuple[int, int]] = []
    options = AutoOptions(points_per_side=4, points_per_batch=6, crop_n_layers=1)
    generate_masks(medsam.Predictor(ours), image, options, progress=lambda d, t: calls.append((d, t)))
    # 5 crops (the image and 2 x 2 tiles), each one embedding and ceil(16 / 6) = 3 batches of clicks
    assert calls[-1] == (5 + 5 * 3, 5 + 5 * 3)
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))

    class Stop(Exception):
        pass

    def stop(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        generate_masks(medsam.Predictor(ours), image, options, progress=stop)
