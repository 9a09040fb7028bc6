"""CPU inference path of :class:`medsam.model.tiny_vit.TinyViT`: the same model, computed in tiles.

The module-by-module forward of TinyViT streams every full-resolution activation through memory:
at 256 x 256 the MBConv stage's hidden tensors are 64 MiB each, and each 1x1 convolution, GELU and
depthwise convolution reads and writes one (plus a page-faulted fresh allocation for every output).
On the project's CPUs (memory streams at 3-10 GB/s) that, not arithmetic, set the encoder's time.

Here each operation sequence runs over small tiles whose intermediates stay in the CPU cache and in
reused allocations:

* the conv blocks (patch embedding, MBConv, PatchMerging) run over bands of output rows: for each
  band the 1x1 expansion with its GELU (a matrix product on the channels-last tokens) of just the
  rows the depthwise 3x3 convolution reads (a one-row halo), that convolution with its GELU, the
  1x1 projection with the residual added in the product, GELU in place;
* the transformer blocks run attention over bands of whole rows of windows (the residual is
  updated in place: windows do not overlap), then the depthwise local convolution and the MLP
  over bands of rows, written into a second buffer that alternates with the first from block to
  block;
* the neck's 1x1 convolution is a matrix product on the tokens and its layer norms act in token
  layout; the embedding is transposed to NCHW as a 2-D copy per sample.

The stage activations and tile intermediates live in scratch buffers kept between calls
(:mod:`medsam.model._workspace`): fresh multi-MiB allocations are page-faulted in on every call,
which on these machines costs as much as the arithmetic of a memory-bound operation. The result
is always a new tensor.

Same parameters, same operations (exact erf GELU, BatchNorm folded as in eval mode), same order of
the residual stream; results differ from the module-by-module forward only by float rounding
(matrix products instead of 1x1 convolutions, bias added before instead of after a product).

Used only for eval-mode inference on CPU tensors (:func:`medsam.model.dispatch.use_cpu_kernels`:
no autograd, no autocast, not while ``torch.compile``, ``torch.export`` or the JIT trace the
model, which see the plain forward). The conv blocks' expansions and depthwise convolutions run
with their GELU fused, through PyTorch's oneDNN operations ``torch.ops.mkldnn._linear_pointwise``
and ``_convolution_pointwise`` (those inductor uses), when a probe shows them present and equal to
the separate operations; otherwise as a product or convolution followed by GELU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import _onednn
from ._workspace import Scratch, scratch
from .dispatch import use_cpu_kernels

if TYPE_CHECKING:
    from .tiny_vit import Conv2dBN, TinyViT, TinyViTBlock

# Target size of one tile's largest intermediate (bytes): the conv blocks' expanded hidden rows,
# the transformer MLP's hidden rows. Measured on the project's 2-core machines (2 MiB L2 per core,
# large shared L3): 4 MiB beat 0.5-2 MiB (more, smaller operations, each with its dispatch and
# thread start-up cost) and 8 MiB (out of cache).
TILE_BYTES = 1 << 22
MLP_TILE_BYTES = 1 << 22
# Tokens (padded) per band of windows in the transformer blocks' attention.
ATTN_TOKENS = 2048

_gelu_ = torch.ops.aten.gelu_


def _expand_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """GELU(x @ w.T + b) for 2-D x and w (out, in) (a 1x1 convolution on tokens): fused, a new
    tensor (one pass; measured faster than the product into a kept buffer and GELU in place
    despite the fresh memory); otherwise into ``out``."""
    if _onednn.available("linear_gelu", x.dtype):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
    return _gelu_(torch.addmm(b, x, w.t(), out=out))


def _depthwise_gelu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride, padding) -> torch.Tensor:
    """GELU(depthwise conv(h)) for channels-last h, a new channels-last tensor."""
    groups = h.shape[1]
    if _onednn.available("depthwise_gelu", h.dtype):
        return torch.ops.mkldnn._convolution_pointwise(
            h, w, b, list(padding), list(stride), [1, 1], groups, "gelu", [], "none"
        )
    return _gelu_(F.conv2d(h, w, b, stride, padding, 1, groups))


def applicable(model: TinyViT, x: torch.Tensor) -> bool:
    """Whether :func:`encode` / :func:`stages` may replace the module-by-module forward for ``x``."""
    if not x.is_floating_point() or not use_cpu_kernels(x):
        return False
    # Every BatchNorm must be folded with running statistics (a submodule left in training mode
    # or without tracked statistics takes the module-by-module forward).
    return not any(
        m.training or (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is None)
        for m in model.modules()
    )


def _matrix(conv: Conv2dBN) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 Conv2dBN as (C_in, C_out) matrix and bias."""
    w, b = conv.folded()
    return w.reshape(w.shape[0], -1).t(), b


def _rows_per_tile(row_bytes: int, stride: int = 1, budget: int | None = None) -> int:
    return max(1, (TILE_BYTES if budget is None else budget) // (row_bytes * stride))


def conv_block(
    x: torch.Tensor,
    conv1: Conv2dBN,
    conv2: Conv2dBN,
    conv3: Conv2dBN,
    residual: bool,
    act_out: bool,
    ws: Scratch,
    out: torch.Tensor | None = None,
    alloc=None,
) -> torch.Tensor:
    """1x1 Conv-BN, GELU, depthwise Conv-BN (any stride), GELU, 1x1 Conv-BN [+ x] [GELU].

    x: (B, H, W, C_in) contiguous tokens; returns (B, H', W', C_out) contiguous tokens, into
    ``out`` or into ``alloc((B, H', W', C_out))`` when given (it must not overlap ``x``).
    """
    B, H, W, cin = x.shape
    w1, b1 = _matrix(conv1)
    w2, b2 = conv2.folded()
    w3, b3 = _matrix(conv3)
    hidden, cout = w1.shape[1], w3.shape[1]
    k, s, p = conv2.c.kernel_size[0], conv2.c.stride[0], conv2.c.padding[0]
    kw, sw, pw = conv2.c.kernel_size[1], conv2.c.stride[1], conv2.c.padding[1]
    ho = (H + 2 * p - k) // s + 1
    wo = (W + 2 * pw - kw) // sw + 1
    if residual and (ho, wo, cout) != (H, W, cin):
        raise ValueError("a residual conv block must keep the shape")
    if alloc is not None:
        out = alloc((B, ho, wo, cout))
    elif out is None:
        out = x.new_empty(B, ho, wo, cout)
    tile = _rows_per_tile(W * hidden * x.element_size(), s)
    w1_oi = w1.t()  # (hidden, C_in), as F.linear takes it
    q = -(-p // s)
    for bi in range(B):
        xb, ob = x[bi], out[bi]
        for a in range(0, ho, tile):
            t = min(tile, ho - a)
            # Hidden rows [lo, hi): what output rows [a, a + t) read, from a row aligned with the
            # stride; the depthwise convolution runs on them with its own padding, and the rows
            # of its output computed against a slab edge inside the image are dropped (j0, t).
            lo = max(a * s - q * s, 0)
            hi = min((a + t - 1) * s - p + k, H)
            h = _expand_gelu(
                xb[lo:hi].view(-1, cin), w1_oi, b1, ws.buffer("tinyvit.hidden", ((hi - lo) * W, hidden), x)
            )
            d = _depthwise_gelu(h.view(1, hi - lo, W, hidden).permute(0, 3, 1, 2), w2, b2, (s, sw), (p, pw))
            j0 = (a * s - lo) // s
            d = d[0, :, j0 : j0 + t].permute(1, 2, 0).reshape(t * wo, hidden)  # a view: channels-last
            o = ob[a : a + t].view(t * wo, cout)
            if residual:
                torch.add(xb[a : a + t].view(t * wo, cout), b3, out=o)
                o.addmm_(d, w3)
            else:
                torch.addmm(b3, d, w3, out=o)
            if act_out:
                _gelu_(o)
    return out


def patch_embed(x: torch.Tensor, seq, out: torch.Tensor | None = None) -> torch.Tensor:
    """``PatchEmbed`` (1x1 Conv-BN, GELU, 1x1 Conv-BN): (B, C, H, W) -> (B, H, W, D) tokens."""
    w1, b1 = _matrix(seq[0])
    w2, b2 = _matrix(seq[2])
    B, cin, H, W = x.shape
    dim = w2.shape[1]
    xt = x.permute(0, 2, 3, 1).contiguous()
    if out is None:
        out = x.new_empty(B, H, W, dim)
    tile = _rows_per_tile(W * dim * x.element_size())
    for bi in range(B):
        for a in range(0, H, tile):
            rows = xt[bi, a : a + tile].reshape(-1, cin)
            h = torch.addmm(b1, rows, w1)
            _gelu_(h)
            torch.addmm(b2, h, w2, out=out[bi, a : a + tile].view(-1, dim))
    return out


def transformer_block(blk: TinyViTBlock, x: torch.Tensor, out: torch.Tensor, ws: Scratch) -> torch.Tensor:
    """One TinyViT block: x (B, H, W, C) contiguous (updated in place by the attention) ->
    ``out`` (same shape, must not overlap x)."""
    B, H, W, C = x.shape
    wsize = blk.window_size
    attn = blk.attn
    heads, hd = attn.num_heads, attn.head_dim
    bias = attn.attention_bias().to(x.dtype).unsqueeze(0)
    padded_w = -(-W // wsize) * wsize
    nw = padded_w // wsize
    n = wsize * wsize
    qkv_w, qkv_b = attn.qkv.weight.t(), attn.qkv.bias
    proj_w, proj_b = attn.proj.weight.t(), attn.proj.bias
    norm = attn.norm
    # Attention over bands of whole window rows (at most ATTN_TOKENS tokens unless one row has
    # more), residual in place.
    nb = max(1, ATTN_TOKENS // (wsize * padded_w))  # window rows per band
    nb = min(nb, -(-H // wsize))
    for a in range(0, H, nb * wsize):
        rows = min(nb * wsize, H - a)
        wr = -(-rows // wsize)  # window rows in this band
        band = x[:, a : a + rows]
        if rows < wr * wsize or padded_w > W:
            padded = ws.buffer("tinyvit.band", (B, wr * wsize, padded_w, C), x)
            padded[:, :rows, :W] = band
            padded[:, :, W:].zero_()
            padded[:, rows:].zero_()
        else:
            padded = band
        nwin = B * wr * nw
        win = ws.buffer("tinyvit.windows", (nwin * n, C), x)
        win.view(B * wr, nw, wsize, wsize, C).copy_(padded.reshape(B * wr, wsize, nw, wsize, C).transpose(1, 2))
        win = F.layer_norm(win, (C,), norm.weight, norm.bias, norm.eps)
        qkv = torch.addmm(qkv_b, win, qkv_w, out=ws.buffer("tinyvit.qkv", (nwin * n, 3 * C), x))
        q, k, v = qkv.view(nwin, n, heads, 3, hd).permute(3, 0, 2, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (windows, heads, n, hd)
        o = torch.addmm(
            proj_b, o.transpose(1, 2).reshape(nwin * n, C), proj_w, out=ws.buffer("tinyvit.proj", (nwin * n, C), x)
        )
        band.add_(o.view(B, wr, nw, wsize, wsize, C).transpose(2, 3).reshape(B, wr * wsize, padded_w, C)[:, :rows, :W])
    # Depthwise local convolution and MLP, over bands of rows, into ``out``.
    lw, lb = blk.local_conv.folded()
    lc = blk.local_conv.c
    ph = lc.padding[0]
    mlp = blk.mlp
    fc1_w, fc1_b = mlp.fc1.weight.t(), mlp.fc1.bias
    fc2_w, fc2_b = mlp.fc2.weight.t(), mlp.fc2.bias
    tile = _rows_per_tile(W * mlp.fc1.out_features * x.element_size(), budget=MLP_TILE_BYTES)
    fused_mlp = x.dtype == torch.bfloat16 and _onednn.available("linear_gelu", x.dtype)
    for bi in range(B):
        xb, ob = x[bi : bi + 1], out[bi]
        for a in range(0, H, tile):
            t = min(tile, H - a)
            lo, hi = max(a - ph, 0), min(a + t + ph, H)
            # Padding ph on every side; rows computed against a band edge inside the image are
            # not used (the slice below keeps exactly the rows [a, a + t)).
            y = F.conv2d(xb[:, lo:hi].permute(0, 3, 1, 2), lw, lb, 1, (ph, lc.padding[1]), 1, C)
            y = y[0, :, a - lo : a - lo + t].permute(1, 2, 0).reshape(t * W, C)  # a view: channels-last
            yn = F.layer_norm(y, (C,), mlp.norm.weight, mlp.norm.bias, mlp.norm.eps)
            if fused_mlp:  # bfloat16: GELU on its own is slow there (it computes in float32)
                h = torch.ops.mkldnn._linear_pointwise(yn, mlp.fc1.weight, fc1_b, "gelu", [], "none")
            else:  # float32: a product into the kept buffer and GELU in place measured faster
                h = torch.addmm(fc1_b, yn, fc1_w, out=ws.buffer("tinyvit.mlp_hidden", (t * W, fc1_w.shape[1]), x))
                _gelu_(h)
            o = ob[a : a + t].view(t * W, C)
            torch.add(y, fc2_b, out=o)
            o.addmm_(h, fc2_w)
    return out


def forward_stages(model: TinyViT, x: torch.Tensor, ws: Scratch) -> torch.Tensor:
    """:meth:`TinyViT.forward_stages` in tiles: (B, C, H, W) -> tokens (B, H/4, W/4, C_last).

    The stages' activations alternate between two scratch buffers; so does the result, which the
    next call overwrites.
    """
    arenas = [0]  # index of the buffer that holds the current activation

    def other(shape: tuple[int, ...]) -> torch.Tensor:
        arenas[0] ^= 1
        return ws.buffer(f"tinyvit.{arenas[0]}", shape, x)

    B, _, H, W = x.shape
    layer0 = model.layers[0]
    t = patch_embed(x, model.patch_embed.seq, out=other((B, H, W, model.embed_dims[0])))
    for blk in layer0.blocks:
        t = conv_block(t, blk.conv1, blk.conv2, blk.conv3, residual=True, act_out=True, ws=ws, out=other(t.shape))
    for layer in model.layers:
        if layer is not layer0:
            for blk in layer.blocks:
                t = transformer_block(blk, t, other(t.shape), ws)
        ds = layer.downsample
        if ds is not None:
            t = conv_block(t, ds.conv1, ds.conv2, ds.conv3, residual=False, act_out=False, ws=ws, alloc=other)
    return t


def stages(model: TinyViT, x: torch.Tensor) -> torch.Tensor:
    """:meth:`TinyViT.forward_stages` for :func:`applicable` inputs (a new tensor)."""
    with scratch() as ws:
        return forward_stages(model, x, ws).clone()


def encode(model: TinyViT, x: torch.Tensor) -> torch.Tensor:
    """:meth:`TinyViT.forward` for :func:`applicable` inputs (a new tensor)."""
    with scratch() as ws:
        return neck(model.neck, forward_stages(model, x, ws), ws)


def neck(neck, t: torch.Tensor, ws: Scratch) -> torch.Tensor:
    """The neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) on tokens (B, H, W, C) ->
    contiguous (B, C', H, W): the 1x1 convolution as a matrix product and the layer norms in
    token layout; the result is transposed to NCHW per sample as a 2-D copy, which PyTorch does
    several times faster than the equivalent 4-D permuted copy."""
    conv1, norm1, conv2, norm2 = neck
    B, H, W, C = t.shape
    d = conv1.out_channels
    n = B * H * W
    y = torch.mm(t.reshape(n, C), conv1.weight.view(d, C).t(), out=ws.buffer("tinyvit.neck0", (n, d), t))
    y = F.layer_norm(y, (d,), norm1.weight, norm1.bias, norm1.eps)
    y = F.conv2d(y.view(B, H, W, d).permute(0, 3, 1, 2), conv2.weight, conv2.bias, conv2.stride, conv2.padding)
    y = y.permute(0, 2, 3, 1).reshape(n, d)  # a view: the convolution keeps channels-last
    y = F.layer_norm(y, (d,), norm2.weight, norm2.bias, norm2.eps).view(B, H, W, d)
    out = y.new_empty(B, d, H, W)
    for bi in range(B):
        out[bi].view(d, H * W).copy_(y[bi].reshape(H * W, d).t())
    return out
