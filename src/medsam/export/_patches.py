"""Traceable rewrites of the models' attention, applied while a graph is traced, never otherwise.

PyTorch's ONNX exporter (``torch.onnx.export(dynamo=True)``) re-runs the traced graph with fake
tensors in its type-promotion pass, and any ``view`` whose input layout differs between the traced
kernels and the fake ones is rejected ("Cannot view a tensor with shape ... and strides ...").
The eager attention code hits this twice: the output of ``scaled_dot_product_attention`` (whose
fake kernel reports other strides) and the encoder's relative-position bias written with
``torch.add(..., out=buffer)`` into a reused buffer and then viewed. Neither is wrong in eager mode;
both are layout optimisations the exporter cannot follow.

So, during an export only, :func:`export_mode`:

* gives every :class:`medsam.model.image_encoder.Attention` an instance-level ``forward``
  (:func:`vit_attention_traceable_forward`) that computes the same attention from the same
  parameters with traceable operations: the decomposed relative-position bias as two batched
  matrix products and a broadcast sum, the attention as scaled ``Q K^T`` + bias, softmax,
  ``@ V``. It keeps the eager code's chunking over query rows (the batch of the exported encoder
  is fixed at 1, so the loop unrolls into a fixed number of chunks), which keeps the ONNX graph's
  peak memory at the bound the chunking gives in PyTorch; one call with the full
  (heads, 4096, 4096) bias would need about 0.8 GB per tensor for ViT-B.
* swaps ``torch.nn.functional.scaled_dot_product_attention`` for :func:`sdpa_reference` (the same
  three operations) for the other attention modules (TinyViT, the two-way transformer), which
  call ``F.scaled_dot_product_attention`` at run time.

Both are undone when the block exits; the library's modules are not edited and their eager
numerics are untouched. (:func:`medsam.compile.compile_model` installs the same traceable
``forward`` for ``torch.compile``, whose inductor backend trips over the ``out=`` buffer in the
same way, and :func:`medsam.compile.uncompile_model` removes it.) Opset 18 has no attention
operator, so the ONNX graph computes these very operations whichever way it is traced. Every
export is checked numerically against eager PyTorch (:func:`medsam.export.onnx.export_onnx` with
``verify=True``), so a change of the eager attention
(parameter layout, scaling) that the export path does not follow shows up as a verification error,
not as a silently different model.
"""

from __future__ import annotations

import contextlib
import math
import threading
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_LOCK = threading.Lock()


def sdpa_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` as plain tensor operations (inference only).

    Supports what the medsam models use: an optional additive float mask or a boolean mask,
    an optional scale. Dropout, causal masking and grouped-query attention are refused.
    """
    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("export-mode attention supports neither dropout, causal masks nor GQA")
    s = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query * s) @ key.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


@contextlib.contextmanager
def export_friendly_attention() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is :func:`sdpa_reference`.

    Process-wide (it patches the ``torch.nn.functional`` module attribute) and so serialised by a
    lock: do not run eager inference in other threads while an export is in progress.
    """
    with _LOCK:
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = sdpa_reference
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original


def vit_attention_traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Traceable twin of :meth:`medsam.model.image_encoder.Attention.forward`.

    Same parameters, same result up to float rounding, same chunking over query rows; the
    relative-position bias is a plain broadcast sum (no ``out=`` buffer), so ``torch.export`` and
    ``torch.compile`` trace it faithfully. ``F.scaled_dot_product_attention`` is looked up at call
    time: the fused kernel under ``torch.compile``, :func:`sdpa_reference` inside
    :func:`export_mode`.
    """
    from ..model import image_encoder as vit

    B, H, W, C = x.shape
    n = H * W
    heads = self.num_heads
    hd = C // heads
    qkv = self.qkv(x).reshape(B, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        rh = vit.relative_position_table(H, H, self.rel_pos_h)  # (H, H, hd)
        rw = vit.relative_position_table(W, W, self.rel_pos_w)  # (W, W, hd)
        # Bias of query (y, x) for key (ky, kx) = <q_yx, Rh[y, ky]> + <q_yx, Rw[x, kx]>, as two
        # batched matrix products (batch y, resp. x) for all queries at once.
        q5 = q.reshape(B * heads, H, W, hd)
        rel_h = torch.matmul(q5.permute(1, 0, 2, 3).reshape(H, B * heads * W, hd), rh.transpose(1, 2))
        rel_h = rel_h.reshape(H, B, heads, W, H).permute(1, 2, 0, 3, 4)  # (B, heads, y, x, ky)
        rel_w = torch.matmul(q5.permute(2, 0, 1, 3).reshape(W, B * heads * H, hd), rw.transpose(1, 2))
        rel_w = rel_w.reshape(W, B, heads, H, W).permute(1, 2, 3, 0, 4)  # (B, heads, y, x, kx)
        max_elements = getattr(vit, "_MAX_BIAS_ELEMENTS", 1 << 24)
        rows_per_chunk = max(1, max_elements // (B * heads * W * n))
        outs = []
        for r0 in range(0, H, rows_per_chunk):
            r1 = min(H, r0 + rows_per_chunk)
            bias = rel_h[:, :, r0:r1].unsqueeze(-1) + rel_w[:, :, r0:r1].unsqueeze(-2)
            bias = bias.reshape(B, heads, (r1 - r0) * W, n)
            outs.append(F.scaled_dot_product_attention(q[:, :, r0 * W : r1 * W], k, v, attn_mask=bias))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    out = out.transpose(1, 2).reshape(B, H, W, C)
    return self.proj(out)


def install_traceable_attention(model: nn.Module) -> list[nn.Module]:
    """Give every ViT ``Attention`` module of ``model`` :func:`vit_attention_traceable_forward` as
    an instance-level ``forward``; returns the modules changed (for :func:`remove_traceable_attention`)."""
    from ..model import image_encoder as vit

    changed = []
    for module in model.modules():
        if isinstance(module, vit.Attention) and "forward" not in vars(module):
            module.forward = types.MethodType(vit_attention_traceable_forward, module)
            changed.append(module)
    return changed


def remove_traceable_attention(modules) -> None:
    """Undo :func:`install_traceable_attention` (``modules``: its result, or a model)."""
    if isinstance(modules, nn.Module):
        modules = list(modules.modules())
    for module in modules:
        forward = vars(module).get("forward")
        if getattr(forward, "__func__", None) is vit_attention_traceable_forward:
            del module.forward  # the class's forward again


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s attention runs the export-friendly code (module docstring)."""
    with export_friendly_attention():
        changed = install_traceable_attention(model)
        try:
            yield
        finally:
            remove_traceable_attention(changed)
