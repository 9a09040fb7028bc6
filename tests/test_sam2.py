"""The SAM2 family against the reference ``sam2==1.1.0`` on seeded random weights saved in the
official format (``{"model": state_dict}``): loading and configuration inference, image features,
the memory encoder and memory attention, and 2D masks / IoU / object scores through
``medsam.Predictor`` against ``SAM2ImagePredictor``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import medsam
from conftest import rel_err, smooth_image
from medsam.model.sam2 import SAM2_CONFIGS, SAM2Model, unpack_features
from medsam.weights import CheckpointError, infer_sam2_config
from reference_sam2 import as_numpy, build_reference_sam2, reference_image_predictor

LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    return build_reference_sam2()


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": reference.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ours(checkpoint):
    return medsam.load_model(checkpoint, device="cpu")


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize(
    "config, file_name, expected",
    [
        ("configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt", "sam2_hiera_tiny"),
        ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt", "sam2_hiera_small"),
        ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt", "sam2_hiera_base_plus"),
        ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt", "sam2_hiera_large"),
        ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny"),
        ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt", "sam2.1_hiera_small"),
        ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_base_plus"),
        ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt", "sam2.1_hiera_large"),
        ("configs/sam2.1/sam2.1_hiera_t.yaml", "MedSAM2_latest.pt", "medsam2"),
    ],
)
def test_every_released_configuration_is_inferred_and_holds_the_official_tensors(config, file_name, expected):
    from sam2.build_sam import build_sam2

    reference_state = build_sam2(config, device="cpu").state_dict()
    inferred = infer_sam2_config(reference_state, file_name)
    assert inferred.name == expected
    ours = SAM2Model(inferred).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference_state.items()}


def test_medsam2_name_arch_override_and_safetensors_roundtrip(reference, tmp_path):
    path = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": reference.state_dict()}, path)
    model = medsam.load_model(path, device="cpu")
    assert (model.config.name, model.input_size, model.contract) == ("medsam2", 512, "medsam2")
    forced = medsam.load_model(path, device="cpu", arch="sam2.1_hiera_tiny")
    assert (forced.input_size, forced.contract) == (1024, "sam2")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        medsam.load_model(path, device="cpu", arch="hiera_huge")
    saved = medsam.save_model(model, tmp_path / "medsam2.safetensors")
    again = medsam.load_model(saved, device="cpu")
    assert again.config == model.config and again.contract == "medsam2"
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_a_sam2_state_with_an_unknown_trunk_is_refused(reference):
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("image_encoder.trunk.blocks.11.")}
    with pytest.raises(CheckpointError, match="matches no released configuration"):
        infer_sam2_config(state, "custom.pt")


# ------------------------------------------------------------------ features and memory
def test_image_features_match_forward_image(reference, ours):
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        backbone = reference.forward_image(x)
        trunk = reference.image_encoder.trunk(x)
        packed = ours.embed_image(x)
        ours_trunk = ours.image_encoder.trunk(x)
        expected_embed = backbone["backbone_fpn"][2] + reference.no_mem_embed.reshape(1, -1, 1, 1)
    for a, b in zip(ours_trunk, trunk, strict=True):
        assert rel_err(a, b) < 1e-6
    image_embed, feat_s1, feat_s0 = unpack_features(packed)
    assert rel_err(image_embed, expected_embed) < 1e-6
    assert rel_err(feat_s1, backbone["backbone_fpn"][1]) < 1e-6
    assert rel_err(feat_s0, backbone["backbone_fpn"][0]) < 1e-6


def test_memory_encoder_and_attention_match(reference, ours):
    g = torch.Generator().manual_seed(2)
    pix = torch.randn(2, 256, 32, 32, generator=g)
    masks = torch.randn(2, 1, 512, 512, generator=g) * 5
    n, pointers = 32 * 32, 16
    current = torch.randn(n, 2, 256, generator=g)
    current_pos = torch.randn(n, 2, 256, generator=g)
    memory = torch.randn(2 * n + pointers, 2, 64, generator=g)
    memory_pos = torch.randn(2 * n + pointers, 2, 64, generator=g)
    with torch.inference_mode():
        for skip in (False, True):
            expected = reference.memory_encoder(pix, masks, skip_mask_sigmoid=skip)
            features, pos = ours.memory_encoder(pix, masks, skip_mask_sigmoid=skip)
            assert rel_err(features, expected["vision_features"]) < 1e-5
            assert rel_err(pos, expected["vision_pos_enc"][0]) < 1e-6
        expected = reference.memory_attention(
            curr=current, memory=memory, curr_pos=current_pos, memory_pos=memory_pos, num_obj_ptr_tokens=pointers
        )
        got = ours.memory_attention(
            current.transpose(0, 1), current_pos.transpose(0, 1), memory.transpose(0, 1), memory_pos.transpose(0, 1), 16
        )
    assert rel_err(got.transpose(0, 1), expected) < 1e-5


# ------------------------------------------------------------------ 2D prediction
def _prompt_cases(H: int, W: int) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    return {
        "box": dict(box=np.array([[0.2 * W, 0.25 * H, 0.7 * W, 0.8 * H]]).round()),
        "two boxes": dict(box=np.array([[0.2 * W, 0.25 * H, 0.7 * W, 0.8 * H], [5, 7, W - 3, H - 2]]).round()),
        "points": dict(points=np.array([[[0.4 * W, 0.5 * H], [0.1 * W, 0.1 * H]]]).round(), labels=np.array([[1, 0]])),
        "box+points": dict(
            box=np.array([[0.2 * W, 0.25 * H, 0.7 * W, 0.8 * H]]).round(),
            points=np.array([[[0.4 * W, 0.5 * H]]]).round(),
            labels=np.array([[1]]),
        ),
        "box+mask": dict(
            box=np.array([[0.2 * W, 0.25 * H, 0.7 * W, 0.8 * H]]).round(),
            mask=rng.standard_normal((1, 1, 256, 256)).astype(np.float32) * 3,
        ),
    }


@pytest.mark.parametrize("multimask", [False, True])
def test_predictor_matches_sam2_image_predictor(reference, ours, multimask):
    image = smooth_image(300, 420, seed=3)
    H, W = image.shape
    predictor = medsam.Predictor(ours)
    predictor.set_image(image)
    x, _ = predictor.contract.prepare_image(image)
    oracle = reference_image_predictor(reference, x, (H, W))
    for name, case in _prompt_cases(H, W).items():
        points, labels = case.get("points"), case.get("labels")
        box, mask = case.get("box"), case.get("mask")
        n = len(box) if box is not None else len(points)
        if mask is not None:
            mask = np.repeat(mask, n, axis=0)
        with torch.no_grad():
            scores_maps, iou, low = oracle.predict(
                point_coords=points,
                point_labels=labels,
                box=box,
                mask_input=None if mask is None else mask[:, 0] if n == 1 else mask,
                multimask_output=multimask,
                return_logits=True,
            )
        got = predictor.predict(boxes=box, points=points, point_labels=labels, mask_input=mask, multimask=multimask)
        expected_low = as_numpy(low).reshape(got.low_res_logits.shape)
        expected_scores = as_numpy(scores_maps).reshape(n, -1, H, W)
        expected_iou = as_numpy(iou).reshape(n, -1)
        # sam2 returns its low-res logits clamped to [-32, 32]; masks come from the unclamped ones
        assert rel_err(np.clip(got.low_res_logits, -32, 32), expected_low) < LOGIT_TOL, name
        assert rel_err(got.scores.reshape(n, -1), expected_iou) < LOGIT_TOL, name
        expected_masks = expected_scores > 0
        got_masks = got.masks.reshape(expected_masks.shape)
        differ = got_masks != expected_masks
        assert not differ.any() or np.abs(expected_scores[differ]).max() < 1e-3, name


def test_object_scores_and_dynamic_single_mask(ours):
    """The decoder's object-score head is exposed, and one requested mask is token 0's unless that
    is unstable (then the best alternative): checked on the decoder's own outputs."""
    torch.manual_seed(0)
    packed = ours.embed_image(torch.randn(1, 3, 1024, 1024)).detach()
    boxes = torch.tensor([[100.0, 100, 600, 700], [0, 0, 1023, 1023], [400, 400, 420, 430]])
    with torch.inference_mode():
        single = ours.decode(packed, boxes=boxes)
        every = ours.decode(packed, boxes=boxes, all_masks=True)
    assert single.object_score_logits is not None and single.object_score_logits.shape == (3, 1)
    stability = ours.sam_mask_decoder.stability_scores(every.logits[:, 0])
    for i in range(3):
        if stability[i] >= 0.98:
            expected = 0
        else:
            expected = 1 + int(every.iou[i, 1:].argmax())
        assert torch.equal(single.logits[i, 0], every.logits[i, expected])


def test_medsam2_contract_is_the_released_inference_recipe():
    """MedSAM2's inference scripts: the windowed uint8 slice as RGB, Pillow's resize to 512 with
    its default (bicubic) filter, / 255, ImageNet mean and std."""
    image = smooth_image(300, 420, seed=5)
    x, geom = medsam.preprocess.get_contract("medsam2", 512).prepare_image(image)
    resized = np.asarray(Image.fromarray(image).convert("RGB").resize((512, 512)), dtype=np.float64) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((resized - mean) / std).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    assert geom.resized_size == (512, 512)


def test_segment_command_on_a_medsam2_checkpoint(reference, tmp_path):
    from medsam.cli import main

    ckpt = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": reference.state_dict()}, ckpt)
    image = smooth_image(200, 240, seed=6)
    Image.fromarray(image).save(tmp_path / "slice.png")
    box = [40, 50, 180, 170]
    code = main(
        ["segment", str(tmp_path / "slice.png"), "--box", *map(str, box), "--checkpoint", str(ckpt)]
        + ["-o", str(tmp_path / "mask.png")]
    )
    assert code == 0
    written = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    predictor = medsam.Predictor(medsam.load_model(ckpt, device="cpu"))
    predictor.set_image(image)
    expected = predictor.predict(boxes=[box]).masks[0]
    assert (written == expected).mean() > 0.999 and expected.any()


def test_sam2_configs_are_registered():
    assert {"sam2.1_hiera_tiny", "sam2_hiera_large", "medsam2"} <= set(SAM2_CONFIGS)
    assert SAM2_CONFIGS["medsam2"].img_size == 512


def test_embedding_key_follows_what_the_features_are_computed_with(ours):
    """SAM2's packed features use the decoder's high-resolution projections and no_mem_embed:
    they key cached embeddings; the rest of the decoder does not."""
    import copy

    from medsam.embedding_cache import encoder_fingerprint

    model = copy.deepcopy(ours)
    before = encoder_fingerprint(model)
    with torch.no_grad():
        model.sam_mask_decoder.iou_token.weight.add_(1.0)
    assert encoder_fingerprint(model) == before
    with torch.no_grad():
        model.sam_mask_decoder.conv_s0.bias.add_(1.0)
    assert encoder_fingerprint(model) != before


def test_onnx_export_and_compile_refuse_a_sam2_model(ours, tmp_path):
    from medsam.compile import compile_model
    from medsam.export import export_onnx

    with pytest.raises(TypeError, match="ONNX export takes"):
        export_onnx(ours, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(TypeError, match="compile_model takes"):
        compile_model(ours)


def test_returned_low_res_logits_are_clamped_as_sam2_does(ours):
    predictor = medsam.Predictor(ours)
    predictor.set_image(smooth_image(64, 64, seed=7))
    got = predictor.predict(boxes=[[5, 5, 50, 50]], multimask=True)
    assert np.abs(got.low_res_logits).max() <= 32.0
