"""PyTorch's oneDNN operations with a fused element-wise step (the ones inductor uses), probed.

``torch.ops.mkldnn._linear_pointwise`` and ``_convolution_pointwise`` are private operations of
PyTorch's CPU build: an older or newer PyTorch, or one built without oneDNN, may lack them or
change them. Each is tried once on a small input and used only if it gives the result of the
separate public operations; the CPU inference paths fall back to those otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# kind -> whether the probe passed; filled on first use (tests may preset it).
_probed: dict[str, bool] = {}


def _probe(kind: str) -> bool:
    g = torch.Generator().manual_seed(0)
    if kind == "depthwise_gelu":  # depthwise convolution + exact GELU, channels-last in and out
        x = torch.randn(1, 8, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, generator=g)
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 1], [1, 1], [1, 1], 8, "gelu", [], "none")
        ref = F.gelu(F.conv2d(x, w, b, 1, (0, 1), 1, 8))
        return y.is_contiguous(memory_format=torch.channels_last) and _same(y, ref)
    x, w, b = torch.randn(37, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    if kind == "linear_gelu":  # x @ w.T + b, exact GELU
        return _same(torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)))
    if kind == "linear":  # x @ w.T
        return _same(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.t())
    raise ValueError(f"unknown oneDNN operation {kind!r}")


def _same(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return y.shape == ref.shape and bool(torch.allclose(y, ref, rtol=1e-5, atol=1e-6))


def available(kind: str) -> bool:
    """Whether the fused oneDNN operation ``kind`` ("linear", "linear_gelu", "depthwise_gelu")
    may be used now: present, equal to the separate operations, and oneDNN not switched off
    (``torch.backends.mkldnn.enabled``)."""
    if kind not in _probed:
        try:
            _probed[kind] = _probe(kind)
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _probed[kind] = False
    return _probed[kind] and torch.backends.mkldnn.enabled
