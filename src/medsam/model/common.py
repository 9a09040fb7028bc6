"""Small building blocks shared by the image encoders and the mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Parameter names (``weight``, ``bias``) match the official SAM checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last layer norm is one fused kernel; permute views cost nothing.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (``lin1``, ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` is being run through a model by plain eager CPU inference: autograd off, no CPU
    autocast, a real CPU tensor (not a tracer's fake or functional one), and neither the JIT
    tracer, ``torch.compile`` nor ``torch.export`` at work. The models' CPU fast paths (which use
    in-place updates, ``out=`` buffers and kept scratch memory) run only then; everything else sees
    the plain module-by-module forward."""
    if torch.is_grad_enabled() or type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    try:
        if torch.is_autocast_enabled("cpu"):
            return False
    except TypeError:  # torch < 2.4
        if torch.is_autocast_cpu_enabled():
            return False
    if torch.jit.is_tracing():
        return False
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return False
    return True
