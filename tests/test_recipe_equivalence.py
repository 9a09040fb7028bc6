"""The 2D pipelines against the reference ``segment-anything==1.0`` (random seeded weights).

The model is the reference's 2-block ViT at SAM's 1024 px input (``build_reference_small_sam``):
what is compared here is the preparation of an image and prompts and the post-processing around
the network, which do not depend on the encoder's depth or width; the full-size networks are
compared path by path in tests/test_model_paths.py.

The MedSAM 2D recipe (the release's MedSAM_Inference.py: skimage bicubic resize to 1024, uint8,
min-max, box * 1024/[W,H,W,H], sigmoid, bilinear resize to (H, W), > 0.5) is written out here
independently and run on the reference model; ``medsam.Predictor`` must reproduce it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.transform import resize

import medsam
from conftest import rel_err, smooth_image
from reference_sam import build_reference_small_sam, import_reference

RTOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    ref = build_reference_small_sam(seed=1, decoder_gain=1.0)
    d = tmp_path_factory.mktemp("ckpt")
    official = d / "medsam_vit_b.pth"
    torch.save(ref.state_dict(), official)
    ddp = d / "medsam_model_latest.pth"
    torch.save(
        {"model": {f"module.{k}": v for k, v in ref.state_dict().items()}, "optimizer": {"lr": 1e-4}, "epoch": 3},
        ddp,
    )
    return ref, official, ddp


# ---------------------------------------------------------------- the recipe
def recipe_embed(ref, image):
    img_3c = np.repeat(image[:, :, None], 3, axis=-1) if image.ndim == 2 else image
    img_1024 = resize(img_3c, (1024, 1024), order=3, preserve_range=True, mode="constant", anti_aliasing=True).astype(
        np.uint8
    )
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    x = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        return ref.image_encoder(x)


def recipe_decode(ref, embedding, H, W, boxes=None, points=None, labels=None, mask=None, multimask=False):
    scale = np.array([W, H, W, H], dtype=np.float64)
    with torch.no_grad():
        box_t = (
            None if boxes is None else torch.as_tensor(np.asarray(boxes) / scale * 1024, dtype=torch.float)[:, None, :]
        )
        pts = None
        if points is not None:
            p = np.asarray(points, dtype=np.float64) / np.array([W, H]) * 1024
            pts = (torch.as_tensor(p, dtype=torch.float), torch.as_tensor(labels))
        m = None if mask is None else torch.as_tensor(mask)
        sparse, dense = ref.prompt_encoder(points=pts, boxes=box_t, masks=m)
        logits, iou = ref.mask_decoder(
            image_embeddings=embedding,
            image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        prob = F.interpolate(torch.sigmoid(logits), size=(H, W), mode="bilinear", align_corners=False)
    return logits.numpy(), iou.numpy(), prob.numpy()


# A non-square grey image and a square RGB image.
IMAGES = {
    "grey_300x420": smooth_image(300, 420, seed=3),
    "rgb_256x256": smooth_image(256, 256, seed=4, channels=3),
}


def prompt_cases(H, W):
    boxes = np.array(
        [[0.2 * W, 0.25 * H, 0.7 * W, 0.8 * H], [5, 7, W - 3, H - 2], [0.5 * W, 0.1 * H, 0.6 * W, 0.3 * H]]
    ).round()
    points = np.array(
        [
            [[0.4 * W, 0.5 * H], [0.1 * W, 0.1 * H]],
            [[0.6 * W, 0.6 * H], [0.65 * W, 0.3 * H]],
            [[0.5 * W, 0.2 * H], [0.9 * W, 0.9 * H]],
        ]
    ).round()
    labels = np.array([[1, 0], [1, 1], [1, 0]])
    rng = np.random.default_rng(0)
    mask = rng.standard_normal((3, 1, 256, 256)).astype(np.float32) * 3
    return {
        "box": dict(boxes=boxes),
        "points": dict(points=points, labels=labels),
        "box+points": dict(boxes=boxes, points=points, labels=labels),
        "box+mask": dict(boxes=boxes, mask=mask),
        "box_multimask": dict(boxes=boxes, multimask=True),
        "points_multimask": dict(points=points, labels=labels, multimask=True),
    }


@pytest.mark.parametrize("image_name", list(IMAGES))
def test_medsam_recipe_equivalence(checkpoints, image_name):
    ref, official, _ddp = checkpoints
    image = IMAGES[image_name]
    H, W = image.shape[:2]
    model = medsam.load_model(official, device="cpu")
    assert model.contract == "medsam"
    predictor = medsam.Predictor(model)
    predictor.set_image(image)
    ref_embedding = recipe_embed(ref, image)
    assert rel_err(predictor.embedding, ref_embedding) < RTOL

    for name, case in prompt_cases(H, W).items():
        multimask = case.get("multimask", False)
        ref_logits, ref_iou, ref_prob = recipe_decode(ref, ref_embedding, H, W, **case)
        kwargs = dict(
            boxes=case.get("boxes"),
            points=case.get("points"),
            point_labels=case.get("labels"),
            mask_input=case.get("mask"),
            multimask=multimask,
        )
        # Full pipeline (our encoder): logits and IoU within tolerance; masks equal wherever the
        # reference probability is not within float noise of the 0.5 threshold.
        result = predictor.predict(**kwargs)
        assert result.low_res_logits.shape == ref_logits.shape, name
        assert rel_err(result.low_res_logits, ref_logits) < RTOL, name
        assert rel_err(result.scores.reshape(ref_iou.shape), ref_iou) < RTOL, name
        ref_masks = ref_prob > 0.5
        if not multimask:
            ref_masks = ref_masks[:, 0]
        decided = np.abs(ref_prob - 0.5) > 1e-4
        if not multimask:
            decided = decided[:, 0]
        assert result.masks.shape == ref_masks.shape
        assert np.array_equal(result.masks[decided], ref_masks[decided]), name
        assert decided.mean() > 0.99

        # Same embedding: the decoder and post-processing reproduce the recipe's masks exactly.
        exact = medsam.Predictor(model)
        exact.set_embedding(ref_embedding, (H, W))
        same = exact.predict(**kwargs)
        # Identical except where the reference probability is within float32 noise of 0.5
        # (a pixel exactly at the threshold can go either way under a 1e-7 change of a logit).
        tie = np.abs(ref_prob - 0.5) <= 1e-6
        if not multimask:
            tie = tie[:, 0]
        assert tie.mean() < 1e-3, name
        assert np.array_equal(same.masks[~tie], ref_masks[~tie]), name
        assert rel_err(same.low_res_logits, ref_logits) < RTOL, name


def test_training_checkpoint_with_ddp_prefix_loads_identically(checkpoints):
    ref, official, ddp = checkpoints
    a = medsam.load_model(official, device="cpu").state_dict()
    b = medsam.load_model(ddp, device="cpu").state_dict()
    assert a.keys() == b.keys() == ref.state_dict().keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], ref.state_dict()[k]), k


def test_sam_contract_matches_reference_predictor(checkpoints):
    ref, official, _ = checkpoints
    sa = import_reference()
    image = smooth_image(300, 420, seed=5, channels=3)
    H, W = image.shape[:2]
    ref_pred = sa.SamPredictor(ref)
    ref_pred.set_image(image)
    model = medsam.load_model(official, contract="sam", device="cpu")
    predictor = medsam.Predictor(model)
    predictor.set_image(image)
    assert rel_err(predictor.embedding, ref_pred.features) < RTOL

    exact = medsam.Predictor(model)
    exact.set_embedding(ref_pred.features, (H, W))
    cases = prompt_cases(H, W)
    for name, case in cases.items():
        multimask = case.get("multimask", False)
        for i in range(3):
            kw = dict(
                box=None if case.get("boxes") is None else case["boxes"][i],
                point_coords=None if case.get("points") is None else case["points"][i],
                point_labels=None if case.get("labels") is None else case["labels"][i],
                mask_input=None if case.get("mask") is None else case["mask"][i],
                multimask_output=multimask,
            )
            ref_masks, ref_iou, ref_low = ref_pred.predict(**kw)
            ours_kw = dict(
                boxes=None if kw["box"] is None else kw["box"][None],
                points=None if kw["point_coords"] is None else kw["point_coords"][None],
                point_labels=None if kw["point_labels"] is None else kw["point_labels"][None],
                mask_input=None if kw["mask_input"] is None else kw["mask_input"][None],
                multimask=multimask,
            )
            ours = predictor.predict(**ours_kw)
            assert rel_err(ours.low_res_logits[0], ref_low) < RTOL, name
            assert rel_err(ours.scores.reshape(-1), ref_iou) < RTOL, name
            same = exact.predict(**ours_kw)
            got = same.masks[0] if multimask else same.masks
            # SAM thresholds logits at 0: identical except at float-noise ties.
            ref_logit_full = ref_pred.model.postprocess_masks(
                torch.as_tensor(ref_low)[None], ref_pred.input_size, ref_pred.original_size
            )[0].numpy()
            tie = np.abs(ref_logit_full) <= 1e-5
            assert tie.mean() < 1e-3, name
            got = got.reshape(ref_masks.shape)
            assert np.array_equal(got[~tie], ref_masks[~tie]), name
