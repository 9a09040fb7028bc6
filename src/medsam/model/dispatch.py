"""Which implementation of the models' math runs: one gate, one switch, one traceable attention.

Every model operation has one reference implementation, the module's ``forward`` (what training,
GPUs, autocast, ``torch.compile`` and ``torch.export`` run). Three operations also have a CPU
inference implementation that computes the same thing in cache-sized blocks with kept buffers:

* the ViT block (:meth:`medsam.model.image_encoder.Block._forward_cpu_inference`),
* the TinyViT stages (:mod:`medsam.model._tiny_vit_inference`),
* the mask decoder's two-way transformer and upscaling (:mod:`medsam.model._decoder_inference`).

Each of them asks :func:`use_cpu_kernels` (the one gate) whether it may run. The answer is yes
only for plain eager fp32/bf16 CPU inference (:func:`eager_cpu_inference`) and while the switch is
on. The switch is process-wide: :func:`set_cpu_kernels`, the context manager :func:`cpu_kernels`,
or ``MEDSAM_CPU_KERNELS=0`` in the environment (read at the first call) turn the CPU
implementations off, so that the reference forward runs everywhere; the test matrix compares both
against the independent oracles.

:func:`scaled_dot_product_attention` is the attention every module calls: PyTorch's fused kernel,
except while ``torch.export`` traces a graph (the ONNX export), where the same three operations
are written out (``softmax(q k^T * scale + mask) v``; ONNX opset 18 has no attention operator,
and the fused kernel's fake-tensor strides break the exporter's type-promotion pass). Nothing is
patched at run time: eager numerics never change.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "cpu_kernels",
    "cpu_kernels_enabled",
    "eager_cpu_inference",
    "scaled_dot_product_attention",
    "set_cpu_kernels",
    "tracing",
    "use_cpu_kernels",
]

ENV_SWITCH = "MEDSAM_CPU_KERNELS"

_enabled: bool | None = None  # None: not yet read from the environment


def cpu_kernels_enabled() -> bool:
    """Whether the CPU inference implementations may run (``MEDSAM_CPU_KERNELS`` unset or not
    ``0``/``false``/``off``, unless :func:`set_cpu_kernels` said otherwise)."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")
    return _enabled


def set_cpu_kernels(enabled: bool) -> bool:
    """Switch the CPU inference implementations on or off for the whole process; returns the
    previous setting."""
    global _enabled
    previous = cpu_kernels_enabled()
    _enabled = bool(enabled)
    return previous


@contextlib.contextmanager
def cpu_kernels(enabled: bool) -> Iterator[None]:
    """Within the block the CPU inference implementations are on (``True``) or off (``False``);
    the previous setting is restored after it. Process-wide: other threads see it too."""
    previous = set_cpu_kernels(enabled)
    try:
        yield
    finally:
        set_cpu_kernels(previous)


def tracing() -> bool:
    """Whether a graph is being traced (``torch.compile``, ``torch.export``, the JIT tracer):
    then the models avoid ``out=`` buffers and in-place layout tricks."""
    return torch.jit.is_tracing() or _compiler_says("is_compiling") or _compiler_says("is_exporting")


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` is being run through a model by plain eager CPU inference: autograd off, no CPU
    autocast, a real CPU tensor (not a tracer's fake or functional one), and nothing tracing."""
    if torch.is_grad_enabled() or type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    try:
        autocast = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        autocast = torch.is_autocast_cpu_enabled()
    if autocast:
        return False
    return not tracing()


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """The one gate of the CPU inference implementations: the switch is on and ``x`` is under
    :func:`eager_cpu_inference`."""
    return cpu_kernels_enabled() and eager_cpu_inference(x)


def _compiler_says(name: str) -> bool:
    """``torch.compiler.<name>()``, False where this torch has no such query."""
    check = getattr(getattr(torch, "compiler", None), name, None)
    return bool(check is not None and check())


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + attn_mask) v`` over the last two axes; q (..., n, d),
    k and v (..., m, d), attn_mask broadcastable to (..., n, m), additive float. PyTorch's fused
    kernel, or the written-out operations while ``torch.export`` traces."""
    if not _compiler_says("is_exporting"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v
