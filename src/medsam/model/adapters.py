"""Med-SA's adapters (Wu et al., "Medical SAM Adapter"): two bottleneck MLPs in every ViT block.

In a block with adapters, the attention output passes through ``Space_Adapter``
(``x + D_fc2(GELU(D_fc1(x)))``) before the residual sum, and the MLP gets a parallel branch:
``x + mlp(norm2(x)) + scale * MLP_Adapter(norm2(x))`` with ``MLP_Adapter(x) = D_fc2(GELU(D_fc1(x)))``.
``D_fc1`` maps the width D to ``ratio * D`` (0.25), ``scale`` is 0.5; names and defaults as Med-SA's.

One difference from Med-SA, on purpose: ``D_fc2`` starts at zero, so an adapted model starts as
the model it adapts (as LoRA's ``B`` does); Med-SA initialises it at random.

Adapters are nonlinear and cannot be folded into the encoder's weights: an adapted model is saved
with them (``ModelConfig.adapter``) and built with them again by :func:`medsam.load_model`.
Blocks with adapters always run the plain (autograd) path, not the CPU inference kernels.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_KINDS = ("", "medsa")


class BottleneckAdapter(nn.Module):
    """``D_fc2(GELU(D_fc1(x)))``, plus ``x`` when ``skip``: (..., D) -> (..., D)."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio + 1e-6))
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.skip = skip
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.D_fc2(self.act(self.D_fc1(x)))
        return x + out if self.skip else out


def add_medsa_adapters(encoder: nn.Module, ratio: float = 0.25, scale: float = 0.5) -> int:
    """Give every block of a ViT image encoder Med-SA's two adapters, in place (on the encoder's
    device and dtype); returns the number of blocks adapted."""
    blocks = getattr(encoder, "blocks", None)
    if not blocks:
        raise ValueError("Med-SA adapters go into ViT encoder blocks; this encoder has none (TinyViT?)")
    reference = next(encoder.parameters())
    for block in blocks:
        dim = block.norm1.normalized_shape[0]
        block.Space_Adapter = BottleneckAdapter(dim, ratio, skip=True).to(reference)
        block.MLP_Adapter = BottleneckAdapter(dim, ratio, skip=False).to(reference)
        block.adapter_scale = scale
    return len(blocks)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters inside ``module``."""
    return [p for n, p in module.named_parameters() if ".Space_Adapter." in f".{n}" or ".MLP_Adapter." in f".{n}"]
