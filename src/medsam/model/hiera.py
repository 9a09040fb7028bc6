"""The Hiera image trunk of SAM2 (hierarchical ViT with query pooling), in the project's own code.

Input: (B, 3, S, S) images already preprocessed by the ``sam2`` contract. Output: one feature map
per stage, highest resolution first: (B, C, S/4, S/4), (B, 2C, S/8, S/8), (B, 4C, S/16, S/16),
(B, 8C, S/32, S/32) with C = ``embed_dim``.

The layout of SAM2's ``Hiera`` (parameter names as in the official checkpoints:
``patch_embed.proj``, ``pos_embed``, ``pos_embed_window``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.layers.0-1, proj}``):

* a 7 x 7 stride-4 convolution makes tokens on an (S/4, S/4) grid (channels last);
* the position embedding is a small background table resized bicubically to the grid plus a
  window-sized table tiled over it;
* the blocks run in four stages; the first block of stages 2-4 doubles the width and the heads,
  max-pools its queries 2 x 2 (and, for the residual, its projected input), so the grid halves;
  blocks attend within windows (``window_spec`` per stage; the first block of a stage still uses
  the previous stage's window, halved by the pooling) except the ``global_att_blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP
from .dispatch import scaled_dot_product_attention
from .image_encoder import window_partition, window_unpartition


def _pool(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """2D pooling of channels-last (B, H, W, C) tokens -> (B, H', W', C)."""
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Self-attention over (B, H, W, dim) tokens whose queries may be pooled -> (B, H', W', dim_out)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # (B, HW, heads, hd) each
        if self.q_pool is not None:
            q = _pool(q.reshape(B, H, W, -1), self.q_pool)
            H, W = q.shape[1:3]
            q = q.reshape(B, H * W, self.num_heads, -1)
        out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm block: (windowed) attention with optional query pooling, then an MLP (GELU)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, act=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H', W', dim_out); H' = H / stride with query pooling."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = _pool(shortcut, self.pool)
        window = self.window_size
        if window > 0:
            x, _padded = window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:
                window //= self.q_stride[0]  # the windows were pooled with the queries
            H, W = shortcut.shape[1:3]
            padded = (-(-H // window) * window, -(-W // window) * window)
            x = window_unpartition(x, window, padded, (H, W))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """SAM2's Hiera trunk: (B, 3, S, S) -> [stage 1 ... stage 4] feature maps, NCHW."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        window_pos_embed_bkg_spatial_size: Sequence[int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        q_pool: int = 3,
        q_stride: tuple[int, int] = (2, 2),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError("stages and window_spec need one entry per stage")
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pooled = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = _PatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.blocks = nn.ModuleList()
        stage = 0
        dim = embed_dim
        for i in range(sum(stages)):
            # the window of a block is its stage's, read before a stage change: the first block
            # of a stage keeps the previous stage's window (its queries are pooled into it)
            window = 0 if i in global_att_blocks else window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(dim, dim_out, num_heads, q_stride=q_stride if i in pooled else None, window_size=window)
            )
            dim = dim_out
        self.channel_list: list[int] = [_block_width(self.blocks[i]) for i in self.stage_ends[::-1]]

    def position_embedding(self, size: tuple[int, int]) -> torch.Tensor:
        """(1, H, W, C) position embedding of an (H, W) token grid."""
        pos = F.interpolate(self.pos_embed, size=size, mode="bicubic")
        window = self.pos_embed_window
        reps = (size[0] // window.shape[-2], size[1] // window.shape[-1])
        return (pos + window.tile(1, 1, *reps)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self.position_embedding((x.shape[1], x.shape[2]))
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


def _block_width(block: nn.Module) -> int:
    """The output width of a :class:`MultiScaleBlock`."""
    assert isinstance(block, MultiScaleBlock)
    return block.dim_out


class _PatchEmbed(nn.Module):
    """7 x 7 stride-4 convolution (``proj``): (B, 3, S, S) -> (B, S/4, S/4, C) channels last."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
