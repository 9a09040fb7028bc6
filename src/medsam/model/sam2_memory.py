"""SAM2's memory: the memory encoder (a frame's features and mask -> a memory) and the memory
attention (the current frame's features attend to the memories), with rotary position encoding.

Layouts are batch first: tokens (B, N, C) with N = E * E image tokens in row-major order.
Parameter names follow the official checkpoints (``memory_encoder.{mask_downsampler.encoder.N,
pix_feat_proj, fuser.layers.N.{dwconv, norm, pwconv1, pwconv2, gamma}, out_proj}``,
``memory_attention.{layers.N.{self_attn, cross_attn_image}.{q,k,v,out}_proj, linear1, linear2,
norm1-3}, norm}``).

Rotary encoding (:func:`axial_rotary_angles`): a head's channels are taken in pairs; the first
half of the pairs turn by the token's column times ``theta ** (-4j / d)``, the second half by its
row, j = 0 .. d/4 - 1 (d = head width). Memory keys of several frames repeat the image's angles
frame by frame; object-pointer tokens at the end of the keys are not rotated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .dispatch import scaled_dot_product_attention
from .fpn_neck import sine_position_encoding


def axial_rotary_angles(head_dim: int, width: int, height: int, theta: float = 10000.0) -> torch.Tensor:
    """(width * height, head_dim / 2) rotation angles of the tokens of a width x height grid,
    row-major: columns' angles in the first half, rows' in the second."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    t = torch.arange(width * height, dtype=torch.float32)
    cols = (t % width).float()
    rows = torch.div(t, width, rounding_mode="floor").float()
    return torch.cat([torch.outer(cols, freqs), torch.outer(rows, freqs)], dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (2i, 2i + 1) of x (..., n, d) by angles (n, d / 2), in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos(), angles.sin()
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RoPEAttention(nn.Module):
    """Multi-head attention with rotary encoding of queries and keys (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``; keys and values may come in ``kv_in_dim`` channels)."""

    def __init__(
        self,
        embedding_dim: int = 256,
        num_heads: int = 1,
        kv_in_dim: int | None = None,
        theta: float = 10000.0,
        repeat_for_keys: bool = False,
    ) -> None:
        super().__init__()
        kv_dim = kv_in_dim or embedding_dim
        self.num_heads = num_heads
        self.theta = theta
        self.repeat_for_keys = repeat_for_keys
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        """q (B, N, C) on a square grid, k and v (B, M, C_kv) -> (B, N, C). The first
        M - ``num_k_exclude_rope`` keys are rotated (as frames of the same grid when M > N)."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        n = q.shape[-2]
        side = int(round(math.sqrt(n)))
        angles = axial_rotary_angles(q.shape[-1], side, side, self.theta).to(q.device)
        q = rotate(q, angles)
        rotated = k.shape[-2] - num_k_exclude_rope
        if rotated > 0:
            if rotated != n and not self.repeat_for_keys:
                raise ValueError(f"{rotated} rotated keys for {n} queries")
            key_angles = angles.repeat(rotated // n, 1)
            k = torch.cat([rotate(k[:, :, :rotated], key_angles), k[:, :, rotated:]], dim=2)
        out = scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class MemoryAttentionLayer(nn.Module):
    """Self-attention (rotary), cross-attention to the memories (rotary, keys + their position
    encoding), ReLU feed-forward; each pre-normed with a residual."""

    def __init__(self, d_model: int = 256, kv_dim: int = 64, dim_feedforward: int = 2048, num_heads: int = 1):
        super().__init__()
        self.self_attn = RoPEAttention(d_model, num_heads)
        self.cross_attn_image = RoPEAttention(d_model, num_heads, kv_in_dim=kv_dim, repeat_for_keys=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor, num_obj_ptr_tokens: int = 0
    ) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h)
        x = x + self.cross_attn_image(self.norm2(x), memory + memory_pos, memory, num_obj_ptr_tokens)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class MemoryAttention(nn.Module):
    """The current frame's tokens (B, N, C) conditioned on memories (B, M, C_mem) -> (B, N, C)."""

    def __init__(self, d_model: int = 256, kv_dim: int = 64, num_layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MemoryAttentionLayer(d_model, kv_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        current: torch.Tensor,
        current_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """``num_obj_ptr_tokens``: the object-pointer tokens at the end of ``memory``."""
        x = current + 0.1 * current_pos
        for layer in self.layers:
            x = layer(x, memory, memory_pos, num_obj_ptr_tokens)
        return self.norm(x)


class MaskDownSampler(nn.Module):
    """(B, 1, 16E, 16E) mask -> (B, embed_dim, E, E): four stride-2 3 x 3 convolutions (channels
    x4 each), each followed by a LayerNorm2d and GELU, then a 1 x 1 projection (``encoder.N``)."""

    def __init__(self, embed_dim: int = 256, layers: int = 4) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = 1
        for _ in range(layers):
            modules += [nn.Conv2d(channels, channels * 4, 3, stride=2, padding=1), LayerNorm2d(channels * 4), nn.GELU()]
            channels *= 4
        modules.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CXBlock(nn.Module):
    """ConvNeXt block: 7 x 7 depthwise convolution, LayerNorm2d, 4x MLP (GELU), scaled residual."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class _Fuser(nn.Module):
    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """A frame's (B, 256, E, E) features and (B, 1, 16E, 16E) mask logits -> its memory
    (B, out_dim, E, E) and that memory's sine position encoding (B, out_dim, E, E)."""

    def __init__(self, in_dim: int = 256, out_dim: int = 64, fuser_layers: int = 2) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = _Fuser(in_dim, fuser_layers)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.out_dim = out_dim

    def forward(
        self, features: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        x = self.pix_feat_proj(features) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        return x, sine_position_encoding(x, self.out_dim).to(x.dtype)
