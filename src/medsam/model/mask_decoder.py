"""SAM's mask decoder: image embedding + prompt embeddings -> low-resolution masks and IoU.

Inputs: image embeddings (1 or B, C, E, E), their positional encoding (1, C, E, E), sparse prompt
embeddings (B, T, C), dense prompt embeddings (B, C, E, E). Outputs: mask logits (B, M, 4E, 4E)
and predicted IoU (B, M), M = 1 (token 0) or 3 (tokens 1..3, ``multimask_output=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _decoder_inference as fast
from ._workspace import scratch
from .common import MLP, LayerNorm2d
from .dispatch import use_cpu_kernels
from .transformer import TwoWayTransformer

# Prompts decoded together at CPU inference (see MaskDecoder.predict_masks).
_PROMPTS_PER_GROUP = 4


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: TwoWayTransformer | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer or TwoWayTransformer(embedding_dim=transformer_dim)
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.output_upscaling = nn.Sequential(
            up(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            up(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        all_masks: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, M, 4E, 4E) and IoU predictions (B, M) of token 0 (M = 1), of tokens 1..3
        (``multimask_output``, M = 3), or of all four, token 0 first (``all_masks``, M = 4)."""
        sel = slice(None) if all_masks else slice(1, None) if multimask_output else slice(0, 1)
        if torch.is_grad_enabled():
            # Training: all hypernetwork MLPs take part (zero gradients for the unused ones, as
            # in the published training, so that weight decay still reaches them).
            masks, iou_pred = self.predict_masks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
            )
            return masks[:, sel], iou_pred[:, sel]
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, mask_tokens=sel
        )
        return masks, iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        mask_tokens: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, 4E, 4E) logits of the mask tokens ``mask_tokens`` (default: all 4, M = 4) and the
        (B, 4) IoU predictions of all four.

        On CPU at inference (no autograd, not traced) the same computation runs over blocks of
        image tokens (:mod:`medsam.model._decoder_inference`), ``_PROMPTS_PER_GROUP`` prompts at
        a time: after the first image->token update every prompt has its own (E*E, C) image
        tokens, and a group's stay in the CPU cache where a whole batch would stream through
        memory. Prompts do not interact, so the result is the batched one.
        """
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {b} prompts: give one embedding, or one per prompt"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        # Without a mask prompt the dense embedding is one vector broadcast over the prompts;
        # then the image tokens are shared (batch 1) until the first image->token update.
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]
        if image_embeddings.dim() == 5:
            return self._predict_volume_masks(image_embeddings + dense, image_pe, tokens, mask_tokens)
        _, _, h, w = image_embeddings.shape
        if b and use_cpu_kernels(sparse_prompt_embeddings):
            n_masks = len(range(self.num_mask_tokens)[mask_tokens])
            masks = image_embeddings.new_empty(b, n_masks, 4 * h, 4 * w)
            iou = []
            with scratch() as ws:
                src, k, key_pe = fast.image_tokens(image_embeddings, dense, image_pe, ws)
                for i in range(0, b, _PROMPTS_PER_GROUP):
                    j = min(b, i + _PROMPTS_PER_GROUP)
                    owned = src.shape[0] != 1  # one embedding per prompt: each group owns its slice
                    own = slice(i, j) if owned else slice(None)
                    hs, keys = fast.transformer(self.transformer, src[own], k[own], key_pe, tokens[i:j], ws, owned)
                    fast.upscale_and_project(self, keys, self._hyper_in(hs, mask_tokens), h, w, out=masks[i:j])
                    iou.append(self.iou_prediction_head(hs[:, 0, :]))
            return masks, torch.cat(iou)
        src = image_embeddings + dense
        if src.shape[0] not in (1, b):
            src = src.expand(b, -1, -1, -1)
        hs, keys = self.transformer(src, image_pe, tokens)
        hyper_in = self._hyper_in(hs, mask_tokens)
        masks = self._upscale_and_project(keys, hyper_in, h, w)
        return masks, self.iou_prediction_head(hs[:, 0, :])

    def _predict_volume_masks(
        self, src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor, mask_tokens: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM-Med3D's decoding: src (1 or B, C, E, E, E) image plus dense embeddings, tokens
        (B, T, C) -> (B, M, 4E, 4E, 4E) logits and (B, 4) IoU predictions."""
        b = tokens.shape[0]
        if src.shape[0] not in (1, b):
            src = src.expand(b, -1, -1, -1, -1)
        hs, keys = self.transformer(src, image_pe, tokens)
        hyper_in = self._hyper_in(hs, mask_tokens)  # (B, M, C/8)
        grid = src.shape[2:]
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, -1, *grid))
        masks = (hyper_in @ upscaled.flatten(2)).reshape(b, -1, *upscaled.shape[2:])
        return masks, self.iou_prediction_head(hs[:, 0, :])

    # Position of the IoU token among the output tokens (SAM2's object-score token comes first).
    _iou_token_index = 0

    def _hyper_in(self, hs: torch.Tensor, mask_tokens: slice) -> torch.Tensor:
        """(B, M, C/8) hypernetwork outputs of the wanted mask tokens (transformer output hs)."""
        first = self._iou_token_index + 1
        mask_tokens_out = hs[:, first : first + self.num_mask_tokens, :]
        wanted = range(self.num_mask_tokens)[mask_tokens]
        return torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in wanted], dim=1)

    def _upscale_and_project(
        self,
        tokens: torch.Tensor,
        hyper_in: torch.Tensor,
        h: int,
        w: int,
        high_res: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``output_upscaling`` followed by the hypernetwork dot product, as matrix products.

        A 2x2 stride-2 transposed convolution maps each input pixel to its own 2x2 output block,
        so it is one (pixels x C_in) x (C_in x 4 C_out) product; the layer norm and GELU act per
        pixel and the mask is a per-pixel dot product, so everything stays in token layout and
        only the final (B, M, 4h, 4w) masks are rearranged into images.

        tokens (B, h*w, C), hyper_in (B, M, C/8) -> (B, M, 4h, 4w) logits. SAM2 adds
        ``high_res = (feat_s0 (1 or B, C/8, 4h, 4w), feat_s1 (1 or B, C/4, 2h, 2w))`` to the two
        transposed convolutions' outputs (before the layer norm, resp. the last GELU).
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        B, n, C = tokens.shape
        c1 = conv1.out_channels
        c2 = conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(C, 4 * c1)  # (C_in, (dy, dx, o))
        x = torch.addmm(conv1.bias.repeat(4), tokens.reshape(B * n, C), w1).reshape(B * n * 4, c1)
        if high_res is not None:
            # feature pixel (2y + dy, 2x + dx) -> row (token (y, x), dy, dx), as x is ordered
            s1 = high_res[1]
            s1 = s1.reshape(s1.shape[0], c1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(-1, n * 4, c1)
            x = (x.reshape(B, n * 4, c1) + s1).reshape(B * n * 4, c1)
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        x = torch.addmm(conv2.bias.repeat(4), x, w2)  # (B*n*4, (ey, ex, o2))
        if high_res is not None:
            # pixel (4y + 2dy + ey, 4x + 2dx + ex) -> row (token (y, x), dy, dx, ey, ex)
            s0 = high_res[0]
            s0 = s0.reshape(s0.shape[0], c2, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)
            x = (x.reshape(B, n * 16, c2) + s0.reshape(-1, n * 16, c2)).reshape(B * n * 4, 4 * c2)
        x = act2(x)
        M = hyper_in.shape[1]
        masks = torch.bmm(x.reshape(B, n * 16, c2), hyper_in.transpose(1, 2))  # (B, n*16, M)
        # token (y, x), first block (dy, dx), second block (ey, ex) -> pixel (4y+2dy+ey, 4x+2dx+ex)
        masks = masks.reshape(B, h, w, 2, 2, 2, 2, M).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(B, M, 4 * h, 4 * w)
