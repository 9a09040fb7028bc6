"""SAM2's mask decoder: SAM's, plus high-resolution features, an object-score head and a sigmoid IoU.

It is :class:`medsam.model.mask_decoder.MaskDecoder` (the same two-way transformer, output tokens,
upscaling and hypernetworks, under the same parameter names) with what SAM2 adds:

* ``obj_score_token``: an output token placed before the IoU token; its transformer output goes
  through ``pred_obj_score_head`` (an MLP, or a Linear layer) to one logit per prompt: whether
  the object is present at all (positive: present);
* ``conv_s0`` / ``conv_s1``: 1 x 1 projections of the image encoder's two higher-resolution maps,
  applied once per image (:meth:`project_high_res`) and added inside the upscaling;
* the IoU head ends in a sigmoid (``iou_prediction_use_sigmoid``);
* ``dynamic_multimask``: asked for one mask, the decoder returns token 0's unless its
  stability score (the area above +0.05 over the area above -0.05, in logits) is below 0.98,
  then the alternative with the highest predicted IoU (``build_sam2``'s inference setting).

Shapes as :class:`MaskDecoder`; ``high_res = (feat_s0 (1 or B, C/8, 4E, 4E), feat_s1 (1 or B,
C/4, 2E, 2E))`` after the projections.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .common import MLP
from .mask_decoder import MaskDecoder
from .transformer import TwoWayTransformer

# SAM2 names the two-way transformer's MLP layers ``mlp.layers.0/1`` where SAM names them
# ``mlp.lin1/2`` (the same ReLU MLP): the module reads and writes SAM2's names.
_MLP_NAMES = (("layers.0.", "lin1."), ("layers.1.", "lin2."))


def _official_mlp_names(mlp: nn.Module) -> None:
    def rename(state: dict[str, Any], prefix: str, pairs: tuple[tuple[str, str], ...]) -> None:
        for key in [k for k in state if k.startswith(prefix)]:
            for old, new in pairs:
                if key.startswith(prefix + old):
                    state[prefix + new + key[len(prefix + old) :]] = state.pop(key)

    def on_load(_module: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
        rename(state, prefix, _MLP_NAMES)

    def on_save(_module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        rename(state, prefix, tuple((new, old) for old, new in _MLP_NAMES))

    mlp.register_load_state_dict_pre_hook(on_load)
    # public from torch 2.5; the same hook under its older private name before
    register_post = getattr(mlp, "register_state_dict_post_hook", None) or mlp._register_state_dict_hook
    register_post(on_save)


class SAM2MaskDecoder(MaskDecoder):
    _iou_token_index = 1

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: TwoWayTransformer | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores_mlp: bool = True,
        dynamic_multimask: bool = True,
        stability_delta: float = 0.05,
        stability_thresh: float = 0.98,
    ) -> None:
        super().__init__(transformer_dim, transformer, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim)
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.pred_obj_score_head: nn.Module = (
            MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
        )
        self.dynamic_multimask = dynamic_multimask
        self.stability_delta = stability_delta
        self.stability_thresh = stability_thresh
        for layer in self.transformer.layers:
            _official_mlp_names(layer.mlp)

    def project_high_res(self, s0: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The neck's (B, C, 4E, 4E) and (B, C, 2E, 2E) maps -> (feat_s0, feat_s1)."""
        return self.conv_s0(s0), self.conv_s1(s1)

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All four masks (B, 4, 4E, 4E), their IoU (B, 4), the mask tokens' transformer outputs
        (B, 4, C) and the object-score logits (B, 1)."""
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {b} prompts: give one embedding, or one per prompt"
            )
        output_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != b:
            src = src.expand(b, -1, -1, -1)
        _, _, h, w = image_embeddings.shape
        hs, keys = self.transformer(src, image_pe, tokens)
        masks = self._upscale_and_project(keys, self._hyper_in(hs, slice(None)), h, w, high_res=high_res)
        iou = self.iou_prediction_head(hs[:, 1, :])
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]
        return masks, iou, mask_tokens_out, self.pred_obj_score_head(hs[:, 0, :])

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res: tuple[torch.Tensor, torch.Tensor],
        all_masks: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, M, 4E, 4E), IoU (B, M) and object-score logits (B, 1): the three
        alternatives (``multimask_output``), all four (``all_masks``, token 0 first), or one
        mask (token 0's, or the best alternative where token 0's is unstable)."""
        masks, iou, tokens, obj = self.predict_all(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res
        )
        if all_masks:
            return masks, iou, obj
        masks, iou, _tokens = self.choose(masks, iou, tokens, multimask_output)
        return masks, iou, obj

    def choose(
        self, masks: torch.Tensor, iou: torch.Tensor, tokens: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From :meth:`predict_all`'s four: the three alternatives with their IoU and mask-token
        outputs, or one mask (the stability fallback at inference) with token 0's output."""
        if multimask_output:
            return masks[:, 1:], iou[:, 1:], tokens[:, 1:]
        if self.dynamic_multimask and not self.training:
            masks, iou = self.stable_single_mask(masks, iou)
            return masks, iou, tokens[:, :1]
        return masks[:, :1], iou[:, :1], tokens[:, :1]

    def stability_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., H, W) logits -> (...) area above +delta over area above -delta (1 when empty)."""
        flat = logits.flatten(-2)
        inner = (flat > self.stability_delta).sum(-1).float()
        outer = (flat > -self.stability_delta).sum(-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def stable_single_mask(self, masks: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best = iou[:, 1:].argmax(dim=-1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks = masks[:, 1:][rows, best].unsqueeze(1)
        best_iou = iou[:, 1:][rows, best].unsqueeze(1)
        stable = self.stability_scores(masks[:, 0]) >= self.stability_thresh
        out_masks = torch.where(stable[:, None, None, None], masks[:, :1], best_masks)
        out_iou = torch.where(stable[:, None], iou[:, :1], best_iou)
        return out_masks, out_iou
