"""The ViT image encoder of Segment Anything (ViT-B/L/H), in the project's own code.

Input: (B, 3, S, S) float images already preprocessed by the model's contract (S = ``img_size``,
1024 for the official weights). Output: (B, ``out_chans``, S/16, S/16) image embeddings
((B, 256, 64, 64) for the official weights).

Parameter names follow the official checkpoints (``patch_embed.proj``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,norm2,mlp.lin1,mlp.lin2}``,
``neck.0-3``) so that official state dicts load with strict checking.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with the decomposed
relative-position bias passed as an additive mask. For global attention the queries are processed
in chunks, so a full (heads, 4096, 4096) attention map is never held in memory at once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .common import LayerNorm2d, MLPBlock

# Upper bound on the number of float elements of one attention-bias chunk (B*heads*q*k).
# 2**24 elements = 64 MiB in fp32: large enough for efficient GEMMs, small enough to stay in memory.
_MAX_BIAS_ELEMENTS = 1 << 24
# Tokens per MLP block at inference: a 512 x 3072 fp32 hidden block is 6 MiB.
_MLP_ROWS = 512


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C, H, W) -> (B, H/p, W/p, D) (channels last)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, C) relative-position table to (length, C) when L differs."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t()


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair along one axis.

    Args:
        q_size, k_size: number of query / key positions along the axis.
        rel_pos: (L, C) learned table, L = 2 * max(q_size, k_size) - 1 after resampling.
    Returns:
        (q_size, k_size, C) tensor.
    """
    table = resize_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[index.long()]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid with decomposed rel-pos bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        n = H * W
        heads = self.num_heads
        # (B, N, 3, heads, hd) -> 3 x (B, heads, N, hd)
        qkv = self.qkv(x).reshape(B, n, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            rh = relative_position_table(H, H, self.rel_pos_h)  # (H, H, hd)
            rw = relative_position_table(W, W, self.rel_pos_w)  # (W, W, hd)
            # Bias of query (y, x) for key (ky, kx) = <q_yx, Rh[y, ky]> + <q_yx, Rw[x, kx]>,
            # computed for all queries at once as two batched products (batch = y, resp. x).
            hd = C // heads
            q5 = q.reshape(B * heads, H, W, hd)
            rel_h = torch.bmm(q5.permute(1, 0, 2, 3).reshape(H, B * heads * W, hd), rh.transpose(1, 2))
            rel_h = rel_h.view(H, B, heads, W, H).permute(1, 2, 0, 3, 4)  # (B, heads, y, x, ky)
            rel_w = torch.bmm(q5.permute(2, 0, 1, 3).reshape(W, B * heads * H, hd), rw.transpose(1, 2))
            rel_w = rel_w.view(W, B, heads, H, W).permute(1, 2, 3, 0, 4)  # (B, heads, y, x, kx)
            rows_per_chunk = max(1, _MAX_BIAS_ELEMENTS // (B * heads * W * n))
            outs = []
            buffer = None
            for r0 in range(0, H, rows_per_chunk):
                r1 = min(H, r0 + rows_per_chunk)
                # The (rows, W, H, W) bias goes straight into a contiguous buffer reused across
                # chunks, so SDPA gets it as an additive mask without a further copy.
                a, b = rel_h[:, :, r0:r1].unsqueeze(-1), rel_w[:, :, r0:r1].unsqueeze(-2)
                if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
                    bias = (a + b).reshape(B, heads, (r1 - r0) * W, n)  # out= has no autograd
                else:
                    shape = (B, heads, r1 - r0, W, H, W)
                    if buffer is None or buffer.shape != shape:
                        buffer = torch.empty(shape, dtype=a.dtype, device=a.device)
                    bias = torch.add(a, b, out=buffer).view(B, heads, (r1 - r0) * W, n)
                qc = q[:, :, r0 * W : r1 * W]
                outs.append(F.scaled_dot_product_attention(qc, k, v, attn_mask=bias))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C), zero-padding H and W up to multiples."""
    B, H, W, C = x.shape
    pad_h = (window - H % window) % window
    pad_w = (window - W % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding away."""
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class Block(nn.Module):
    """Transformer block: windowed (window_size > 0) or global (window_size == 0) attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, (H, W))
        else:
            x = self.attn(x)
        if torch.is_grad_enabled():
            x = shortcut + x
            return x + self.mlp(self.norm2(x))
        # Inference: the residual stream (the block's input, owned by the encoder) is updated in
        # place, keeping its dtype (fp32 under autocast, as the out-of-place sum would give), and
        # the MLP (norm, 4x-wide hidden layer, GELU, projection) runs over row blocks whose hidden
        # activations stay in the CPU cache instead of streaming a (tokens x 4C) tensor through
        # memory three times.
        x = shortcut.add_(x) if shortcut.dtype == torch.promote_types(shortcut.dtype, x.dtype) else shortcut + x
        if not x.is_contiguous():  # e.g. a permuted patch embedding: make the stream dense once
            x = x.contiguous()
        flat = x.view(-1, x.shape[-1])
        for r0 in range(0, flat.shape[0], _MLP_ROWS):
            rows = flat[r0 : r0 + _MLP_ROWS]
            rows.add_(self.mlp(self.norm2(rows)))
        return x


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder. (B, 3, S, S) -> (B, out_chans, S/patch, S/patch)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
