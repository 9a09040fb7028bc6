"""The ViT image encoder of Segment Anything (ViT-B/L/H), in the project's own code.

Input: (B, 3, S, S) float images already preprocessed by the model's contract (S = ``img_size``,
1024 for the official weights). Output: (B, ``out_chans``, S/16, S/16) image embeddings
((B, 256, 64, 64) for the official weights).

Parameter names follow the official checkpoints (``patch_embed.proj``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,norm2,mlp.lin1,mlp.lin2}``,
``neck.0-3``) so that official state dicts load with strict checking.

Attention runs through :func:`medsam.model.dispatch.scaled_dot_product_attention` (PyTorch's fused
kernel; written-out operations under ``torch.export``) with the decomposed relative-position bias
passed as an additive mask. For global attention the queries are processed
in chunks, so a full (heads, 4096, 4096) attention map is never held in memory at once (except
under ``torch.inference_mode`` on a GPU, where one image's map is one chunk: 768 MiB of bias in
fp32 for ViT-B, measured faster).

At fp32 eager CPU inference (the gate :func:`medsam.model.dispatch.use_cpu_kernels`) each block
without adapters (:mod:`medsam.model.adapters`) takes :meth:`Block._forward_cpu_inference`: the
same operations, float rounding apart, arranged for two cores (the qkv projection of real tokens
only into a kept buffer, the window padding filled with the projection's bias, attention per head
and block of query rows in a kept score buffer). See docs/performance.md for the measurements
that chose each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _onednn
from ._workspace import Scratch, scratch
from .common import LayerNorm2d, MLPBlock
from .dispatch import scaled_dot_product_attention, tracing, use_cpu_kernels

# Upper bound on the number of float elements of one attention-bias chunk (B*heads*q*k).
# 2**24 elements = 64 MiB in fp32: large enough for efficient GEMMs, small enough to stay in memory.
_MAX_BIAS_ELEMENTS = 1 << 24
# The same bound under torch.inference_mode on a GPU (Predictor.embed; not no_grad training
# passes): 2**28 elements (1 GiB in fp32) hold a whole ViT-B global attention of one image
# (12 x 4096 x 4096), which an H200 ran 1.7x faster in fp32 and 1.5x in bf16 than 13 chunks of
# 2**24 (benchmarks/gpu_check.py, docs/performance.md); the reference holds that map 2-3 times over.
_CUDA_INFERENCE_BIAS_ELEMENTS = 1 << 28
# Tokens per MLP block at inference without autograd on a CPU: a 512 x 3072 fp32 hidden block is
# 6 MiB and stays in cache. On a GPU the blocks only bound memory: 16384 tokens (four 1024 px
# images, a 192 MiB fp32 hidden block) per launch.
_MLP_ROWS = 512
_GPU_MLP_ROWS = 16384
# Largest hidden-layer block of the MLP at fp32 CPU inference (4096 tokens x 3072 = 48 MiB).
_CPU_MLP_HIDDEN_BYTES = 64 << 20
# Score elements (queries x keys) of one head per step of the CPU attention with relative
# positions: 2**22 = 16 MiB in fp32 (1024 queries x 4096 keys at 1024 px), measured fastest on
# 2 cores among 1-64 grid rows per step and 1-12 heads per step.
_CPU_SCORE_ELEMENTS = 1 << 22


def attention_with_rel_pos_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    vt: torch.Tensor | None,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
    ws: Scratch,
) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v for fp32 CPU inference, per head and block of grid rows
    (all of a head's windows at once when they are small); ``ws`` holds the score buffer.

    Shapes: q, k, v (B, heads, n, hd) with unit last stride (views of the qkv projection are
    fine), or instead of v its transpose vt (B, heads, hd, n), contiguous; rel_h
    (B, heads, H, W, H) and rel_w (B, heads, H, W, W) (any strides) with n = H * W,
    the bias of query (y, x) for key (ky, kx) being ``rel_h[y, x, ky] + rel_w[y, x, kx]``.
    Returns (B, n, heads, hd), contiguous.

    The same operations as SDPA with the bias as an additive mask, ordered differently: per step
    the bias is written into a kept score buffer (16 MiB), the scaled product q k^T accumulated
    onto it by one GEMM, the softmax taken in place and the product with v written into the
    output layout. No (heads, n, n) map or full bias tensor exists; the only copies are v^T per
    head for oneDNN's product (measured faster than MKL's for this narrow shape).
    """
    B, heads, n, hd = q.shape
    H, W = grid
    out = q.new_empty(B, n, heads, hd)
    if n * n <= _CPU_SCORE_ELEMENTS:  # small grids (windows): a group of them per head at once
        group = min(B, _CPU_SCORE_ELEMENTS // (n * n))
        scores = ws.buffer("vit.scores", (group, n, n), q)
        v_h = ws.buffer("vit.v_head", (group, n, hd), q)
        out_h = ws.buffer("vit.out_head", (group, n, hd), q)
        for b0 in range(0, B, group):
            g = slice(b0, min(B, b0 + group))
            G = g.stop - b0
            buffer = scores[:G]
            for h in range(heads):
                torch.add(rel_h[g, h].unsqueeze(-1), rel_w[g, h].unsqueeze(-2), out=buffer.view(G, H, W, H, W))
                buffer.baddbmm_(q[g, h], k[g, h].transpose(1, 2), alpha=scale)
                torch.ops.aten._softmax.out(buffer, -1, False, out=buffer)
                # contiguous operands: ~1.5x faster than the strided views, copies included
                v_h[:G].copy_(v[g, h] if v is not None else vt[g, h].transpose(1, 2))
                torch.bmm(buffer, v_h[:G], out=out_h[:G])
                out[g, :, h] = out_h[:G]
        return out
    rows = max(1, min(H, _CPU_SCORE_ELEMENTS // (W * n)))  # grid rows of queries per step
    buffer = ws.buffer("vit.scores", (rows * W, n), q)
    onednn = _onednn.available("linear")
    for b in range(B):
        for h in range(heads):
            kt = k[b, h].transpose(0, 1)
            if onednn:  # (hd, n): oneDNN's weight layout
                v_t = vt[b, h] if vt is not None else v[b, h].t().contiguous()
            else:
                v_bh = v[b, h] if v is not None else vt[b, h].t()
            for r0 in range(0, H, rows):
                r1 = min(H, r0 + rows)
                m = (r1 - r0) * W
                scores = buffer[:m]
                torch.add(
                    rel_h[b, h, r0:r1].unsqueeze(-1),
                    rel_w[b, h, r0:r1].unsqueeze(-2),
                    out=scores.view(r1 - r0, W, H, W),
                )
                scores.addmm_(q[b, h, r0 * W : r1 * W], kt, alpha=scale)
                torch.ops.aten._softmax.out(scores, -1, False, out=scores)
                if onednn:  # measured ~1.4x faster than MKL's for this (m x n) @ (n x 64) product
                    out[b, r0 * W : r1 * W, h] = torch.ops.mkldnn._linear_pointwise(scores, v_t, None, "none", [], "")
                else:
                    torch.mm(scores, v_bh, out=out[b, r0 * W : r1 * W, h])
    return out


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


# Grids up to this many tokens get their relative-position terms from one product with the whole
# table (Attention._rel_pos_views); larger ones from one product per grid row.
_REL_POS_TABLE_MAX_TOKENS = 1024


def _rel_pos_per_row(
    q: torch.Tensor, grid: tuple[int, int], rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis bias terms for queries q (B, heads, n, hd) on an (H, W) grid: rel_h
    (B, heads, y, x, ky) = <q_yx, Rh[y, ky]> and rel_w (B, heads, y, x, kx) = <q_yx, Rw[x, kx]>
    (permuted views), as two batched products (batch = y, resp. x)."""
    B, heads, _n, hd = q.shape
    H, W = grid
    rh = relative_position_table(H, H, rel_pos_h)  # (H, H, hd)
    rw = relative_position_table(W, W, rel_pos_w)  # (W, W, hd)
    q5 = q.reshape(B, heads, H, W, hd)  # a view
    rel_h = torch.bmm(q5.permute(2, 0, 1, 3, 4).reshape(H, B * heads * W, hd), rh.transpose(1, 2))
    rel_h = rel_h.view(H, B, heads, W, H).permute(1, 2, 0, 3, 4)
    rel_w = torch.bmm(q5.permute(3, 0, 1, 2, 4).reshape(W, B * heads * H, hd), rw.transpose(1, 2))
    rel_w = rel_w.view(W, B, heads, H, W).permute(1, 2, 3, 0, 4)
    return rel_h, rel_w


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
        """(B, H, W, C) tokens -> (B, H, W, C)."""
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor, ws: Scratch | None = None) -> torch.Tensor:
        """The attention between the projections: (B, H, W, 3C) output of ``qkv`` -> (B, H, W, C)
        input of ``proj``. With ``ws`` (fp32 CPU inference only) relative-position attention runs
        through :func:`attention_with_rel_pos_cpu` with its score buffer there."""
        B, H, W, C3 = qkv.shape
        C = C3 // 3
        n = H * W
        heads = self.num_heads
        # (B, N, 3, heads, hd) -> 3 x (B, heads, N, hd)
        qkv = qkv.reshape(B, n, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if ws is not None and self.use_rel_pos:
            return self.attend_cpu(q, k, v, None, (H, W), ws).view(B, H, W, C)
        if not self.use_rel_pos:
            out = scaled_dot_product_attention(q, k, v)
        else:
            rel_h, rel_w = _rel_pos_per_row(q, (H, W), self.rel_pos_h, self.rel_pos_w)
            traced = tracing()
            gpu_inference = q.is_cuda and not traced and torch.is_inference_mode_enabled()
            limit = _CUDA_INFERENCE_BIAS_ELEMENTS if gpu_inference else _MAX_BIAS_ELEMENTS
            rows_per_chunk = max(1, limit // (B * heads * W * n))
            outs = []
            buffer = None
            for r0 in range(0, H, rows_per_chunk):
                r1 = min(H, r0 + rows_per_chunk)
                # The (rows, W, H, W) bias goes straight into a contiguous buffer reused across
                # chunks, so SDPA gets it as an additive mask without a further copy. Autograd
                # (out= has none) and graph tracers (which cannot follow a view of an out=
                # buffer) get the plain broadcast sum.
                a, b = rel_h[:, :, r0:r1].unsqueeze(-1), rel_w[:, :, r0:r1].unsqueeze(-2)
                if traced or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
                    bias = (a + b).reshape(B, heads, (r1 - r0) * W, n)
                else:
                    shape = (B, heads, r1 - r0, W, H, W)
                    if buffer is None or buffer.shape != shape:
                        buffer = torch.empty(shape, dtype=a.dtype, device=a.device)
                    bias = torch.add(a, b, out=buffer).view(B, heads, (r1 - r0) * W, n)
                qc = q[:, :, r0 * W : r1 * W]
                outs.append(scaled_dot_product_attention(qc, k, v, attn_mask=bias))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2).reshape(B, H, W, C)

    def attend_cpu(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        vt: torch.Tensor | None,
        grid: tuple[int, int],
        ws: Scratch,
    ) -> torch.Tensor:
        """Relative-position attention for fp32 CPU inference: q, k (B, heads, n, hd) and v
        (same) or vt (B, heads, hd, n, contiguous), unit last strides -> (B, n, heads, hd)."""
        rel_h, rel_w = self._rel_pos_views(q, grid)
        return attention_with_rel_pos_cpu(q, k, v, vt, rel_h, rel_w, grid, q.shape[-1] ** -0.5, ws)

    def _rel_pos_views(self, q: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-axis bias terms for queries q (B, heads, n, hd): rel_h (B, heads, y, x, ky) =
        <q_yx, table_h[y - ky]> and rel_w (B, heads, y, x, kx) = <q_yx, table_w[x - kx]>.

        For small grids (windows) each is one product of the queries with the whole (2S - 1, hd)
        table (all relative offsets), read back through a strided view that picks offset
        ``y - ky`` for each query row y (the table is flipped so that the picked column grows
        with ky): no copy of the queries, no per-row batches. For large grids (global attention)
        that product's narrow (2S - 1)-column output measured 3x slower than one batched product
        per grid row (:func:`_rel_pos_per_row`), which is used there.
        """
        B, heads, n, hd = q.shape
        H, W = grid
        if n > _REL_POS_TABLE_MAX_TOKENS:
            return _rel_pos_per_row(q, grid, self.rel_pos_h, self.rel_pos_w)
        qh = q.transpose(0, 1).reshape(heads, B * n, hd)  # a view for projections of a buffer
        products = []
        for size, table in ((H, self.rel_pos_h), (W, self.rel_pos_w)):
            flipped = resize_rel_pos(table, 2 * size - 1).flip(0)  # row j: offset k - q = j - (size - 1)
            prod = torch.empty(heads, B * n, 2 * size - 1, dtype=q.dtype, device=q.device)
            for h in range(heads):
                torch.mm(qh[h], flipped.t(), out=prod[h])
            products.append(prod)
        ph, pw = products
        Lh, Lw = 2 * H - 1, 2 * W - 1
        # element (b, h, y, x, ky) of rel_h = ph[h, b * n + y * W + x, (H - 1) - y + ky]
        rel_h = ph.as_strided((B, heads, H, W, H), (n * Lh, B * n * Lh, W * Lh - 1, Lh, 1), ph.storage_offset() + H - 1)
        # element (b, h, y, x, kx) of rel_w = pw[h, b * n + y * W + x, (W - 1) - x + kx]
        rel_w = pw.as_strided((B, heads, H, W, W), (n * Lw, B * n * Lw, W * Lw, Lw - 1, 1), pw.storage_offset() + W - 1)
        return rel_h, rel_w


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


def _window_spans(size: int, window: int) -> list[tuple[int, int, int]]:
    """(first window, number of windows, rows per window) of the full windows along an axis of
    ``size`` tokens and of the last, partial one if any."""
    full, rest = divmod(size, window)
    spans = [(0, full, window)] if full else []
    if rest:
        spans.append((full, 1, rest))
    return spans


def qkv_windows(qkv: torch.Tensor, window: int, bias: torch.Tensor, out: torch.Tensor) -> None:
    """Window partition of projected tokens, padding included, without projecting the padding.

    The module-by-module forward pads the normalised tokens with zeros and projects all of them;
    every zero token projects to the same vector (the bias of a plain Linear), so here only the
    real tokens are projected (qkv, (B, H, W, 3C)) and the padding is filled with ``bias`` (3C),
    the projection of a zero token. ``out`` (B * nWin, window, window, 3C) receives the windows
    as :func:`window_partition` orders them.
    """
    B, H, W, C3 = qkv.shape
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    nh, nw = Hp // window, Wp // window
    grid = out.view(B, nh, nw, window, window, C3).permute(0, 1, 3, 2, 4, 5)  # (B, nh, wy, nw, wx, 3C)
    for i0, ni, hr in _window_spans(H, window):
        for j0, nj, wc in _window_spans(W, window):
            src = qkv[:, i0 * window : i0 * window + ni * hr, j0 * window : j0 * window + nj * wc]
            grid[:, i0 : i0 + ni, :hr, j0 : j0 + nj, :wc] = src.view(B, ni, hr, nj, wc, C3)
    if Hp > H:
        grid[:, nh - 1, H - (nh - 1) * window :] = bias
    if Wp > W:
        grid[:, :, :, nw - 1, W - (nw - 1) * window :] = bias


def windows_to_grid(windows: torch.Tensor, window: int, size: tuple[int, int]) -> torch.Tensor:
    """:func:`window_unpartition` in one copy: (B * nWin, window, window, C) -> (B, H, W, C)."""
    H, W = size
    nh, nw = -(-H // window), -(-W // window)
    C = windows.shape[-1]
    B = windows.shape[0] // (nh * nw)
    grid = windows.view(B, nh, nw, window, window, C).permute(0, 1, 3, 2, 4, 5)
    out = windows.new_empty(B, H, W, C)
    for i0, ni, hr in _window_spans(H, window):
        for j0, nj, wc in _window_spans(W, window):
            dst = out[:, i0 * window : i0 * window + ni * hr, j0 * window : j0 * window + nj * wc]
            dst.view(B, ni, hr, nj, wc, C).copy_(grid[:, i0 : i0 + ni, :hr, j0 : j0 + nj, :wc])
    return out


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
        adapted = hasattr(self, "Space_Adapter")  # Med-SA adapters (medsam.model.adapters)
        if not adapted and x.dtype == torch.float32 and self.attn.use_rel_pos and use_cpu_kernels(x):
            return self._forward_cpu_inference(x)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, (H, W))
        else:
            x = self.attn(x)
        if adapted:
            x = shortcut + self.Space_Adapter(x)
            normed = self.norm2(x)
            return x + self.mlp(normed) + self.adapter_scale * self.MLP_Adapter(normed)
        if torch.is_grad_enabled():
            x = shortcut + x
            return x + self.mlp(self.norm2(x))
        # Inference: the residual stream (the block's input, owned by the encoder) is updated in
        # place, keeping its dtype (fp32 under autocast, as the out-of-place sum would give), and
        # on a CPU the MLP (norm, 4x-wide hidden layer, GELU, projection) runs over row blocks
        # whose hidden activations stay in the CPU cache instead of streaming a (tokens x 4C)
        # tensor through memory three times.
        x = shortcut.add_(x) if shortcut.dtype == torch.promote_types(shortcut.dtype, x.dtype) else shortcut + x
        if not x.is_contiguous():  # e.g. a permuted patch embedding: make the stream dense once
            x = x.contiguous()
        return self._mlp_in_place(x)

    def _mlp_in_place(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1, x.shape[-1])
        step = _MLP_ROWS if flat.device.type == "cpu" else _GPU_MLP_ROWS
        for r0 in range(0, flat.shape[0], step):
            rows = flat[r0 : r0 + step]
            rows.add_(self.mlp(self.norm2(rows)))
        return x

    def _mlp_in_place_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_mlp_in_place` for fp32 CPU inference with plain Linear layers: the hidden
        layer of up to 64 MiB of tokens at once in a kept buffer (MKL's GEMMs run at ~330 GFLOP/s
        on 512-row blocks and ~385 on 4096 rows here), GELU in place, and the second product
        accumulated straight onto the residual stream before its bias is added."""
        mlp = self.mlp
        lin1, lin2 = mlp.lin1, mlp.lin2
        if not (
            type(lin1) is nn.Linear
            and type(lin2) is nn.Linear
            and type(mlp.act) is nn.GELU
            and lin1.bias is not None
            and lin2.bias is not None
        ):
            return self._mlp_in_place(x)
        flat = x.view(-1, x.shape[-1])
        hidden = lin1.out_features
        rows = max(1, min(flat.shape[0], _CPU_MLP_HIDDEN_BYTES // (4 * hidden)))
        with scratch() as ws:
            h = ws.buffer("vit.mlp_hidden", (rows, hidden), x, _CPU_MLP_HIDDEN_BYTES)
            for r0 in range(0, flat.shape[0], rows):
                part = flat[r0 : r0 + rows]
                hp = h[: part.shape[0]]
                torch.addmm(lin1.bias, self.norm2(part), lin1.weight.t(), out=hp)
                torch.ops.aten.gelu_(hp, approximate=mlp.act.approximate)
                part.addmm_(hp, lin2.weight.t()).add_(lin2.bias)
        return x

    def _forward_cpu_inference(self, x: torch.Tensor) -> torch.Tensor:
        """The block for fp32 eager CPU inference (same operations, float rounding apart): the
        qkv projection into a kept buffer (a fresh 38-45 MiB tensor per block would be
        page-faulted in every time), only real tokens projected in windowed blocks
        (:func:`qkv_windows`), attention by :func:`attention_with_rel_pos_cpu`, the projection
        on real tokens only, the residual stream updated in place."""
        B, H, W, C = x.shape
        attn = self.attn
        if not x.is_contiguous():
            x = x.contiguous()
        xn = self.norm1(x).view(-1, C)
        with scratch() as ws:
            plain = type(attn.qkv) is nn.Linear and attn.qkv.bias is not None
            if plain and self.window_size == 0:
                out = self._global_attention_cpu(xn, (H, W), ws)
            else:
                out = self._attention_cpu(xn, (B, H, W, C), ws)
            del xn
        x.add_(attn.proj(out))
        return self._mlp_in_place_cpu(x)  # after the with-block: it takes the kept buffers too

    def _attention_cpu(self, xn: torch.Tensor, shape: tuple[int, int, int, int], ws: Scratch) -> torch.Tensor:
        """Windowed attention, or global attention through a non-plain qkv projection, of
        normalised tokens xn (B * H * W, C): (B, H, W, C), the input of ``proj``."""
        B, H, W, C = shape
        attn = self.attn
        proj_qkv = attn.qkv
        keep = 64 << 20
        if type(proj_qkv) is nn.Linear and proj_qkv.bias is not None:
            qkv = ws.buffer("vit.qkv", (B * H * W, 3 * C), xn, keep)
            torch.addmm(proj_qkv.bias, xn, proj_qkv.weight.t(), out=qkv)
        else:  # e.g. a LoRA-adapted projection: its own forward
            qkv = proj_qkv(xn)
        qkv = qkv.view(B, H, W, 3 * C)
        if self.window_size > 0:
            wsz = self.window_size
            n_win = B * (-(-H // wsz)) * (-(-W // wsz))
            windows = ws.buffer("vit.qkv_windows", (n_win, wsz, wsz, 3 * C), xn, keep)
            # The padding: the projection of a zero token (its bias, for a plain Linear).
            qkv_windows(qkv, wsz, proj_qkv(xn.new_zeros(1, C))[0], windows)
            return windows_to_grid(attn.attend(windows, ws), wsz, (H, W))
        return attn.attend(qkv, ws)

    def _global_attention_cpu(self, xn: torch.Tensor, grid: tuple[int, int], ws: Scratch) -> torch.Tensor:
        """Global attention of normalised tokens xn (B * n, C) with a plain qkv Linear: q and k
        projected into a kept (B * n, 2C) buffer, v projected straight into its transpose
        (C, n) per image (the layout of the P @ V product; the same GEMM, no transposing copy).
        Returns (B, H, W, C), the input of ``proj``."""
        attn = self.attn
        H, W = grid
        n = H * W
        C = xn.shape[1]
        B = xn.shape[0] // n
        heads = attn.num_heads
        hd = C // heads
        weight, bias = attn.qkv.weight, attn.qkv.bias
        qk = ws.buffer("vit.qkv", (B * n, 2 * C), xn, 64 << 20)
        torch.addmm(bias[: 2 * C], xn, weight[: 2 * C].t(), out=qk)
        vt = ws.buffer("vit.vt", (B, C, n), xn, 64 << 20)
        for b in range(B):
            torch.addmm(bias[2 * C :, None], weight[2 * C :], xn[b * n : (b + 1) * n].t(), out=vt[b])
        qk = qk.view(B, n, 2, heads, hd).permute(2, 0, 3, 1, 4)  # (2, B, heads, n, hd)
        # per-head contiguous q and k: the q k^T products then run ~3 % faster per block,
        # copy included (measured back to back on one global block)
        qkc = ws.buffer("vit.qk_heads", (2, B, heads, n, hd), xn, 64 << 20)
        qkc.copy_(qk)
        out = attn.attend_cpu(qkc[0], qkc[1], None, vt.view(B, heads, hd, n), grid, ws)
        return out.view(B, H, W, C)


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
