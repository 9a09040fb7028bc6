"""PyTorch's oneDNN operations with a fused element-wise step (the ones inductor uses), probed.

``torch.ops.mkldnn._linear_pointwise`` and ``_convolution_pointwise`` are private operations of
PyTorch's CPU build: an older or newer PyTorch, or one built without oneDNN, may lack them or
change them. Each is tried once on a small input and used only if it gives the result of the
separate public operations; the CPU inference paths fall back to those otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (kind, dtype) -> whether the probe passed; filled on first use (tests may preset it).
_probed: dict[tuple[str, torch.dtype], bool] = {}


def _probe(kind: str, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    if kind == "depthwise_gelu":  # depthwise convolution + exact GELU, channels-last in and out
        x = rand(1, 8, 5, 6).contiguous(memory_format=torch.channels_last)
        w, b = rand(8, 1, 3, 3), rand(8)
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 1], [1, 1], [1, 1], 8, "gelu", [], "none")
        ref = F.gelu(F.conv2d(x.float(), w.float(), b.float(), 1, (0, 1), 1, 8))
        return y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) and _same(y, ref)
    x, w, b = rand(37, 8), rand(16, 8), rand(16)
    if kind == "linear_gelu":  # x @ w.T + b, exact GELU
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        return y.dtype == dtype and _same(y, F.gelu(F.linear(x.float(), w.float(), b.float())))
    if kind == "linear":  # x @ w.T
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return y.dtype == dtype and _same(y, x.float() @ w.float().t())
    raise ValueError(f"unknown oneDNN operation {kind!r}")


def _same(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal to the float32 reference within the rounding of ``y``'s dtype."""
    tol = (1e-5, 1e-6) if y.dtype == torch.float32 else (2e-2, 5e-2)
    return y.shape == ref.shape and bool(torch.allclose(y.float(), ref, rtol=tol[0], atol=tol[1]))


def available(kind: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the fused oneDNN operation ``kind`` ("linear", "linear_gelu", "depthwise_gelu")
    may be used now on ``dtype`` tensors (float32 or bfloat16): present, equal to the separate
    operations, and oneDNN not switched off (``torch.backends.mkldnn.enabled``)."""
    key = (kind, dtype)
    if key not in _probed:
        if dtype not in (torch.float32, torch.bfloat16):
            _probed[key] = False
        else:
            try:
                _probed[key] = _probe(kind, dtype)
            except (AttributeError, RuntimeError, NotImplementedError, TypeError):
                _probed[key] = False
    return _probed[key] and torch.backends.mkldnn.enabled
