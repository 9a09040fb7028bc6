"""The reference ``sam2==1.1.0`` (Meta's package, built with ``SAM2_BUILD_CUDA=0``) as a test oracle.

Its image transforms import torchvision, which does not import beside the local CPU torch: the
same inert stand-in as for segment-anything is registered first, and the oracle is driven below
its transforms (features from ``forward_image``, prompts through ``SAM2ImagePredictor.predict``
with the image already set).
"""

from __future__ import annotations

import numpy as np
import torch

from reference_sam import _install_torchvision_stub


def build_reference_sam2(config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", seed: int = 0):
    """The reference model of ``config`` with seeded random weights (the parameters that SAM2
    initialises to zeros or ones are perturbed too), in eval mode on the CPU."""
    _install_torchvision_stub()
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(config, device="cpu")
    perturb(model)
    return model.eval()


def build_reference_medsam2_tracker(seed: int = 0):
    """The reference video predictor in MedSAM2's configuration (SAM2.1 Hiera-T at 512 px), seeded
    random weights (:func:`perturb`), the object-score head biased so that objects are present,
    hole filling off (its CUDA kernel is not built here)."""
    _install_torchvision_stub()
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(seed)
    model = build_sam2_video_predictor(
        "configs/sam2.1/sam2.1_hiera_t.yaml", device="cpu", hydra_overrides_extra=["++model.image_size=512"]
    )
    perturb(model)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(8.0)
    model.fill_hole_area = 0
    return model.eval()


def perturb(model) -> None:
    """Seeded noise on the parameters SAM2 initialises to constants (norms, biases, tokens,
    position and memory embeddings), so that every one of them matters in a comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 or "pos_embed" in name or "token" in name or "no_" in name or "tpos" in name:
                p.add_(torch.randn_like(p) * 0.05)


def reference_image_predictor(model, x: torch.Tensor, original_size: tuple[int, int]):
    """``SAM2ImagePredictor`` of ``model`` with the (1, 3, S, S) preprocessed image ``x`` set, as its
    ``set_image`` does after its transforms (features, ``no_mem_embed``, per-level reshape)."""
    _install_torchvision_stub()
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam2.utils.transforms import SAM2Transforms

    predictor = SAM2ImagePredictor.__new__(SAM2ImagePredictor)
    predictor.model = model
    transforms = SAM2Transforms.__new__(SAM2Transforms)
    torch.nn.Module.__init__(transforms)
    transforms.resolution = model.image_size
    transforms.mask_threshold = 0.0
    transforms.max_hole_area = 0.0
    transforms.max_sprinkle_area = 0.0
    predictor._transforms = transforms
    predictor.mask_threshold = 0.0
    E = model.image_size // 16
    predictor._bb_feat_sizes = [(4 * E, 4 * E), (2 * E, 2 * E), (E, E)]
    with torch.no_grad():
        backbone = model.forward_image(x)
        _, feats, _, _ = model._prepare_backbone_features(backbone)
        feats[-1] = feats[-1] + model.no_mem_embed
        maps = [
            f.permute(1, 2, 0).view(1, -1, *size)
            for f, size in zip(feats[::-1], predictor._bb_feat_sizes[::-1], strict=True)
        ][::-1]
    predictor._features = {"image_embed": maps[-1], "high_res_feats": maps[:-1]}
    predictor._orig_hw = [tuple(original_size)]
    predictor._is_image_set = True
    predictor._is_batch = False
    return predictor


def as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def assert_labels_follow_logits(labels: np.ndarray, logits: list[dict[int, torch.Tensor]]) -> None:
    """``labels`` (Z, H, W) give each voxel to the object with the highest reference logit above 0
    (``logits[i][z]``: object i + 1's video-resolution logits on frame z), except where a logit
    decides within rounding (the winning margin or the logit itself under 1e-3)."""
    for z in range(labels.shape[0]):
        stack = torch.stack([per_object[z] for per_object in logits]).numpy()
        expected = np.where(stack.max(axis=0) > 0, stack.argmax(axis=0) + 1, 0)
        differ = labels[z] != expected
        if differ.any():
            top2 = np.sort(stack, axis=0)
            margin = np.minimum(np.abs(stack.max(axis=0)), top2[-1] - top2[-2]) if len(stack) > 1 else np.abs(stack[0])
            assert margin[differ].max() < 1e-3, z
