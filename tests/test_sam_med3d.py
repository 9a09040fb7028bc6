"""SAM-Med3D against its published network (``medim==0.1.2``, ``medim/models/sam_med3d.py``), its
published iterative click inference (SAM-Med3D's ``utils/infer_utils.sam_model_infer``, written
out below on medim's modules) and its published preprocessing (torchio), on seeded random
weights saved in the release format."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ref = pytest.importorskip("medim.models.sam_med3d", reason="the SAM-Med3D oracle medim==0.1.2 is not installed")

from medsam.model.sam_med3d import SamMed3DConfig, SamMed3DModel
from medsam.weights import CheckpointError, load_model

CT = "tests/data/curation/ct/images/example_ct_crop.nii.gz"
CT_LABELS = "tests/data/curation/ct/labels/example_ct_crop_seg.nii.gz"


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every tensor the published initialisation leaves at zero or one
    (relative and absolute positions, norms, biases), so that no term can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "rel_pos" in name or "pos_embed" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
            elif name.endswith(".bias") or "norm" in name:
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ref.build_sam3D_vit_b_ori().eval()
    _randomise(model, 1)
    return model


@pytest.fixture(scope="module")
def release_checkpoint(reference, tmp_path_factory):
    """The reference's weights in SAM-Med3D's release format (train.py's save_checkpoint)."""
    path = tmp_path_factory.mktemp("sam_med3d") / "sam_med3d_turbo.pth"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=8e-5)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [120, 180], 0.1)
    torch.save(
        {
            "epoch": 200,
            "model_state_dict": reference.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "lr_scheduler_state_dict": scheduler.state_dict(),
            "losses": [0.41, np.float64(0.39)],
            "dices": [np.float32(0.71)],
            "best_loss": np.inf,
            "best_dice": np.float64(0.71),
            "args": argparse.Namespace(task_name="turbo", lr=8e-5, gpu_ids=[0, 1]),
            "used_datas": ["AMOS"],
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def ours(release_checkpoint) -> SamMed3DModel:
    model = load_model(release_checkpoint, device="cpu")
    assert isinstance(model, SamMed3DModel)
    return model


def _reference_clicks(model, image_embedding, clicks, labels):
    """sam_model_infer's loop: click n decoded with clicks 1..n and the previous low-res logits
    (zeros first), through medim's prompt encoder and mask decoder."""
    low = torch.zeros(1, 1, 32, 32, 32)
    coords, point_labels = torch.zeros(1, 0, 3), torch.zeros(1, 0)
    with torch.no_grad():
        for click, label in zip(clicks, labels, strict=True):
            coords = torch.cat([coords, torch.tensor([[click]], dtype=torch.float32)], dim=1)
            point_labels = torch.cat([point_labels, torch.tensor([[label]], dtype=torch.int64)], dim=1)
            sparse, dense = model.prompt_encoder(points=[coords, point_labels], boxes=None, masks=low)
            low, _ = model.mask_decoder(
                image_embeddings=image_embedding,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
            )
        full = F.interpolate(low, size=(128, 128, 128), mode="trilinear", align_corners=False)
    return low, (torch.sigmoid(full) > 0.5)[0, 0].numpy().astype(np.uint8)


def test_release_checkpoint_loads_weights_only_with_its_architecture(ours, release_checkpoint):
    assert ours.config == SamMed3DConfig()
    assert ours.contract == "sam_med3d"
    # torch's weights-only loader alone refuses the argparse options and numpy numbers; medsam
    # allows those records (data) and nothing more: a pickled callable is still refused.
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(release_checkpoint, weights_only=True)
    evil = release_checkpoint.with_name("evil.pth")
    torch.save({"model_state_dict": ours.state_dict(), "args": argparse.ArgumentParser}, evil)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_model(evil)


def test_encoder_and_one_and_three_click_inference_equal_the_reference(reference, ours):
    gen = torch.Generator().manual_seed(2)
    crop = torch.randn(1, 1, 128, 128, 128, generator=gen)
    with torch.no_grad():
        expected = reference.image_encoder(crop)
        embedding = ours.embed_image(crop)
    assert embedding.shape == (1, 384, 8, 8, 8)
    assert (embedding - expected).abs().max().item() < 1e-4

    from medsam.native3d import decode_clicks

    clicks = np.array([[64, 60, 70], [30, 41, 52], [90, 75, 66]])
    labels = np.array([1, 0, 1])
    for n in (1, 3):
        want_low, want_mask = _reference_clicks(reference, expected, clicks[:n].tolist(), labels[:n].tolist())
        low = decode_clicks(ours, expected, clicks[:n], labels[:n])
        assert (low - want_low).abs().max().item() < 1e-4
        full = F.interpolate(low, size=(128, 128, 128), mode="trilinear", align_corners=False)
        mask = (torch.sigmoid(full) > 0.5)[0, 0].numpy()
        differ = mask != want_mask.astype(bool)
        # identical except where the upsampled logit is a tie at the threshold
        assert np.all(np.abs(full[0, 0].numpy()[differ]) < 1e-4)
        assert 0 < want_mask.sum() < want_mask.size  # a real mask, neither empty nor full


def test_windowed_blocks_larger_than_one_window_equal_the_reference():
    """Grids larger than a window (the general windowed path) and an uneven padding."""
    torch.manual_seed(3)
    encoder = ref.ImageEncoderViT3D(
        img_size=64,
        patch_size=4,
        embed_dim=48,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        out_chans=48,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        use_rel_pos=True,
        window_size=6,
        global_attn_indexes=(1,),
    ).eval()
    _randomise(encoder, 4)
    config = SamMed3DConfig(
        img_size=64,
        patch_size=4,
        embed_dim=48,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        prompt_embed_dim=48,
        window_size=6,
        global_attn_indexes=(1,),
    )
    ours = SamMed3DModel(config).image_encoder.eval()
    ours.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(x) - encoder(x)).abs().max().item() < 1e-4


def test_architecture_is_read_from_the_tensors(reference, tmp_path):
    from medsam.weights import infer_sam_med3d_config

    assert infer_sam_med3d_config(reference.state_dict()) == SamMed3DConfig()
    broken = {k: v for k, v in reference.state_dict().items() if "neck" not in k}
    path = tmp_path / "broken.pth"
    torch.save({"model_state_dict": broken}, path)
    with pytest.raises(CheckpointError, match="SAM-Med3D"):
        load_model(path)


def _torchio_reference(model, clicks_ijk, positive):
    """The published pipeline (infer_utils.data_preprocess / sam_model_infer / data_postprocess)
    with the positive clicks' voxels as its label; clicks given in the crop as medsam maps them."""
    tio = pytest.importorskip("torchio", reason="torchio (the published preprocessing) is not installed")
    import nibabel as nib

    img = nib.load(CT)
    marks = np.zeros(img.shape, dtype=np.uint8)
    for (i, j, k), pos in zip(clicks_ijk, positive, strict=True):
        if pos:
            marks[i, j, k] = 1
    subject = tio.Subject(
        image=tio.ScalarImage(CT), label=tio.LabelMap(tensor=torch.from_numpy(marks)[None], affine=img.affine)
    )
    original_affine, original_shape = subject.image.affine.copy(), subject.image.spatial_shape
    subject = tio.ToCanonical()(tio.Resample(target=(1.5, 1.5, 1.5))(subject))
    cropped = tio.CropOrPad(mask_name="label", target_shape=(128, 128, 128))(subject)
    roi = tio.ZNormalization(masking_method=lambda x: x > 0)(cropped.image.data.clone())
    return roi[0], cropped.label.data[0], cropped.image.affine, original_affine, original_shape, tio


def test_pipeline_on_a_real_ct_equals_the_published_one_with_torchio(ours, reference):
    from medsam.io import read_image
    from medsam.native3d import VoxelClick, segment_clicks_3d

    labels = np.asarray(__import__("nibabel").load(CT_LABELS).dataobj)
    organ = np.argwhere(labels == 2)  # a kidney-sized organ of the TotalSegmentator labels
    centre = organ[np.argmin(np.abs(organ - organ.mean(axis=0)).sum(axis=1))]
    near = [centre + np.array(d) for d in ((6, 0, 0), (-6, 0, 0), (0, 6, 0), (0, -6, 0))]
    inside = [v for v in near if all(0 <= a < n for a, n in zip(v, labels.shape, strict=True))]
    outside = next(v for v in inside if labels[tuple(v)] != 2)  # beside the organ: a negative click
    clicks_ijk = [tuple(int(v) for v in centre), tuple(int(v) for v in outside), tuple(int(v) for v in organ[0])]
    positive = [True, False, True]
    image = read_image(CT)
    result = segment_clicks_3d(ours, image, [VoxelClick(c, p) for c, p in zip(clicks_ijk, positive, strict=True)])
    assert len(result.clicks_in_cube) == 3
    # a click beyond the crop is left out of it, with a warning
    far = [VoxelClick(c, p) for c, p in zip(clicks_ijk, positive, strict=True)] + [VoxelClick((5, 5, 3), False)]
    with pytest.warns(UserWarning, match="outside the first"):
        assert len(segment_clicks_3d(ours, image, far).clicks_in_cube) == 3

    roi, roi_label, roi_affine, original_affine, original_shape, tio = _torchio_reference(ours, clicks_ijk, positive)

    np.testing.assert_allclose(result.grid.affine, roi_affine, atol=1e-6)
    assert torch.equal(result.cube, roi)  # resampled, reoriented, cropped and z-scored alike
    # each positive click falls on the voxels torchio carried its label to
    for (a, b, c), pos in zip(result.clicks_in_cube, positive, strict=True):
        if pos:
            assert roi_label[a, b, c] == 1
    with torch.no_grad():
        embedding = reference.image_encoder(roi[None, None].float())
    _, want_cube = _reference_clicks(reference, embedding, result.clicks_in_cube.tolist(), [int(p) for p in positive])
    logits = F.interpolate(result.low_res_logits, size=(128,) * 3, mode="trilinear", align_corners=False)
    differ = result.cube_mask != want_cube
    assert differ.sum() <= 1e-4 * differ.size
    assert np.all(np.abs(logits[0, 0].numpy()[differ]) < 1e-4)  # ties at the threshold only
    assert want_cube.sum() > 0
    # back onto the input's grid as data_postprocess does (torchio, nearest neighbour)
    back = tio.Resample(
        target=tio.ScalarImage(tensor=torch.zeros(1, *original_shape), affine=original_affine),
        image_interpolation="nearest",
    )(tio.LabelMap(tensor=torch.from_numpy(result.cube_mask)[None].float(), affine=roi_affine))
    want = back.data[0].numpy().astype(np.uint8).transpose(2, 1, 0)  # (i, j, k) -> (Z, Y, X)
    assert np.array_equal(result.mask, want)


def test_cli_point_ijk_writes_the_mask_with_the_input_geometry(ours, release_checkpoint, tmp_path):
    import nibabel as nib

    out = tmp_path / "kidney.nii.gz"
    cmd = [sys.executable, "-m", "medsam", "segment", CT, "--checkpoint", str(release_checkpoint)]
    cmd += ["--point", "40", "20", "10", "--negative-point", "5", "5", "3", "--sliding-window", "-o", str(out)]
    cmd += ["--overlay", str(tmp_path / "overlay.png")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    written, source = nib.load(out), nib.load(CT)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)

    from medsam.io import read_image
    from medsam.native3d import VoxelClick, segment_clicks_3d

    clicks = [VoxelClick((40, 20, 10)), VoxelClick((5, 5, 3), False)]
    direct = segment_clicks_3d(ours, read_image(CT), clicks, sliding_window=True)
    assert np.array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), direct.mask)
    report = json.loads(out.with_name("kidney.scores.json").read_text())
    assert report["points"] == [[40, 20, 10, 1], [5, 5, 3, 0]]
    assert [c["begin_ras"] for c in report["crops"]] == [list(w.begin) for w in direct.windows]
    from PIL import Image

    assert Image.open(tmp_path / "overlay.png").size == (64, 48)  # slice k = 10 of the first click


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--point", "40", "20", "100"], "outside the volume"),
        (["--point", "40.5", "20", "10"], "integer"),
        (["--point", "40", "20", "10", "--point", "4", "5"], "not both"),
        (["--negative-point", "40", "20", "10"], "positive click"),
        (["--point", "40", "20", "10", "--box", "1", "1", "5", "5"], "only prompt"),
        (["--box", "1", "1", "2", "5", "5", "6", "--sliding-window"], "applies to voxel clicks"),
    ],
)
def test_bad_voxel_clicks_get_one_clear_error(release_checkpoint, tmp_path, extra, message):
    out = tmp_path / "m.nii.gz"
    cmd = [sys.executable, "-m", "medsam", "segment", CT, "--checkpoint", str(release_checkpoint), "-o", str(out)]
    run = subprocess.run(cmd + extra, capture_output=True, text=True)
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_a_sam_med3d_checkpoint_refuses_boxes_and_other_models_refuse_voxel_clicks(release_checkpoint, tmp_path):
    from medsam.segment import segment_file

    with pytest.raises(ValueError, match="voxel clicks"):
        segment_file(CT, tmp_path / "a.nii.gz", [[5, 5, 2, 30, 30, 8]], checkpoint=release_checkpoint)
    with pytest.raises(ValueError, match="SAM-Med3D checkpoint"):
        segment_file(CT, tmp_path / "b.nii.gz", [], voxel_points=((40, 20, 10, True),))
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(ValueError, match="grey volume"):
        segment_file(tmp_path / "flat.png", tmp_path / "c.png", [], voxel_points=((4, 4, 0, True),))
    np.savez(tmp_path / "case.npz", imgs=np.zeros((4, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="need a volume file"):
        segment_file(tmp_path / "case.npz", tmp_path / "d.npz", [], voxel_points=((4, 4, 0, True),))


def test_sliding_windows_grow_the_object_past_the_cube_and_average_overlaps(ours, reference):
    """Each extra cube is decoded from its recorded clicks exactly as the published loop decodes
    one cube; where cubes overlap the mask is that of their mean logits."""
    from medsam.io import read_image
    from medsam.io._sitk import to_sitk
    from medsam.native3d import (
        VoxelClick,
        canonical_array,
        crop_or_pad,
        resample_isotropic,
        segment_clicks_3d,
        zscore_foreground,
    )

    image = read_image(CT)
    clicks = [VoxelClick((40, 20, 10))]
    single = segment_clicks_3d(ours, image, clicks)
    grown = segment_clicks_3d(ours, image, clicks, sliding_window=True, max_windows=3)
    # the CT is 128 x 96 x 48 voxels at 1.5 mm: only axis 0 goes on past the cube, on one side
    assert len(single.windows) == 1 and len(grown.windows) == 2
    assert grown.windows[0].begin == single.windows[0].begin
    for window in grown.windows[1:]:
        assert window.labels[0] == 1  # the seed click from the mask so far
        assert max(abs(a - b) for a, b in zip(window.begin, grown.windows[0].begin, strict=True)) == 64

    resampled = resample_isotropic(to_sitk(image.array, image), 1.5)
    volume, affine = canonical_array(resampled)
    total = np.zeros(volume.shape, dtype=np.float32)
    count = np.zeros(volume.shape, dtype=np.float32)
    for window in grown.windows:
        cube = zscore_foreground(crop_or_pad(volume, window.begin, 128))
        with torch.no_grad():
            embedding = reference.image_encoder(cube[None, None])
        low, _ = _reference_clicks(reference, embedding, window.clicks.tolist(), window.labels.tolist())
        full = F.interpolate(low, size=(128,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()
        padded = np.zeros([n + 256 for n in volume.shape], dtype=np.float32)
        hits = np.zeros_like(padded)
        at = tuple(slice(b + 128, b + 256) for b in window.begin)
        padded[at], hits[at] = full, 1
        inner = tuple(slice(128, 128 + n) for n in volume.shape)
        total += padded[inner]
        count += hits[inner]
    mean = total / np.maximum(count, 1)
    want = (mean > 0) & (count > 0)
    from medsam.native3d import _back_to_input

    expected = _back_to_input(want.astype(np.uint8), affine, to_sitk(image.array, image))
    differ = grown.mask != expected
    assert differ.sum() <= 1e-4 * differ.size
    # the object continues past the first cube (canonical axis 0 below its first index)
    assert want[: grown.windows[0].begin[0]].any()


def test_info_describes_and_the_workbench_refuses_a_sam_med3d_checkpoint(tmp_path):
    from medsam.weights import save_model

    config = SamMed3DConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, prompt_embed_dim=48)
    path = save_model(SamMed3DModel(config), tmp_path / "tiny3d.safetensors")
    info = subprocess.run([sys.executable, "-m", "medsam", "info", str(path)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "SAM-Med3D" in info.stdout and "contract: sam_med3d" in info.stdout
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, "-m", "medsam", "serve", "--data", str(tmp_path / "data"), "--checkpoint", str(path)]
    serve = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and "give SAM-Med3D with --model3d" in serve.stderr
    from medsam.default_model import bundled_checkpoint

    cmd = [sys.executable, "-m", "medsam", "serve", "--data", str(tmp_path / "data"), "--model3d"]
    serve = subprocess.run([*cmd, str(bundled_checkpoint())], capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and "--model3d takes a SAM-Med3D checkpoint" in serve.stderr


def test_predictor_on_a_volume_embeds_each_crop_once_and_equals_the_function(ours):
    from medsam.io import read_image
    from medsam.native3d import Native3DPredictor, VoxelClick, segment_clicks_3d

    image = read_image(CT)
    predictor = Native3DPredictor(ours)
    with pytest.raises(RuntimeError, match="set_volume"):
        predictor.predict([VoxelClick((40, 20, 10))])
    predictor.set_volume(image)
    sessions = [
        [VoxelClick((40, 20, 10))],
        [VoxelClick((40, 20, 10)), VoxelClick((30, 20, 10), False)],  # a negative click: the crop stays
        [VoxelClick((40, 20, 10)), VoxelClick((30, 20, 10), False), VoxelClick((42, 22, 11), False)],
    ]
    for n, clicks in enumerate(sessions, start=1):
        got, want = predictor.predict(clicks), segment_clicks_3d(ours, image, clicks)
        assert np.array_equal(got.mask, want.mask) and torch.equal(got.low_res_logits, want.low_res_logits)
        assert got.grid.begin == want.grid.begin
        assert predictor.encoder_calls == 1, n  # the decoder alone after the first click
    # Every distinct cube is embedded once: a crop moved by another positive click, and the cubes
    # of a sliding window, cost one encoder call each the first time only.
    begins = {want.grid.begin}
    moved = [VoxelClick((40, 20, 10)), VoxelClick((10, 40, 20))]
    got = predictor.predict(moved)
    begins.add(got.grid.begin)
    assert np.array_equal(got.mask, segment_clicks_3d(ours, image, moved).mask)
    for _ in range(2):
        slid = predictor.predict(sessions[0], sliding_window=True)
        begins.update(w.begin for w in slid.windows)
        assert np.array_equal(slid.mask, segment_clicks_3d(ours, image, sessions[0], sliding_window=True).mask)
    assert predictor.encoder_calls == len(begins) <= predictor.capacity


def test_workbench_segments_volumes_from_voxel_clicks(ours, tmp_path):
    import shutil

    from PIL import Image

    from conftest import seeded_tiny_model, smooth_image
    from medsam.io import read_image
    from medsam.native3d import VoxelClick, segment_clicks_3d
    from medsam.server import create_app
    from medsam.server.encoding import rle_decode
    from workbench_fixtures import client

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(CT, data / "ct.nii.gz")
    Image.fromarray(smooth_image(32, 40, seed=1)).save(data / "flat.png")
    clicks = [{"i": 40, "j": 20, "k": 10}, {"i": 30, "j": 20, "k": 10, "positive": False}]
    with client(create_app(data, model=seeded_tiny_model(), model3d=ours)) as c:
        assert c.get("/info").json()["model3d"]["img_size"] == ours.config.img_size
        r = c.post("/segment3d", json={"image_id": "ct.nii.gz", "clicks": clicks[:1]})
        assert r.status_code == 200, r.text
        r = c.post("/segment3d", json={"image_id": "ct.nii.gz", "clicks": clicks})
        out = r.json()
        mask = rle_decode(out["mask"]["values"], out["mask"]["counts"], tuple(out["mask"]["shape"]))
        want = segment_clicks_3d(
            ours, read_image(data / "ct.nii.gz"), [VoxelClick((40, 20, 10)), VoxelClick((30, 20, 10), False)]
        )
        assert np.array_equal(mask, want.mask) and out["area"] == int(want.mask.sum()) > 0
        assert out["crops"] == [list(w.begin) for w in want.windows]
        assert out["encoder_calls"] == 1  # the second request reused the first one's crop embedding
        # the mask can be saved as the volume's label map
        saved = c.put("/labels/ct.nii.gz/map", json={"mask": out["mask"]}, headers={"If-Match": '"0"'})
        assert saved.status_code == 200, saved.text
        bad = [
            ({"image_id": "flat.png", "clicks": clicks[:1]}, 422),
            ({"image_id": "ct.nii.gz", "clicks": [{"i": 4000, "j": 1, "k": 1}]}, 422),
            ({"image_id": "ct.nii.gz", "clicks": [{"i": 1, "j": 1, "k": 1, "positive": False}]}, 422),
            ({"image_id": "ct.nii.gz", "clicks": []}, 422),
            ({"image_id": "nope.nii.gz", "clicks": clicks}, 404),
        ]
        for body, status in bad:
            assert c.post("/segment3d", json=body).status_code == status, body
    with client(create_app(data, model=seeded_tiny_model())) as c:
        assert c.get("/info").json()["model3d"] is None
        r = c.post("/segment3d", json={"image_id": "ct.nii.gz", "clicks": clicks})
        assert r.status_code == 409 and "--model3d" in r.json()["detail"]
    with pytest.raises(ValueError, match="SAM-Med3D"):
        create_app(data, model=seeded_tiny_model(), model3d=seeded_tiny_model())
