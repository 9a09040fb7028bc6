"""LoRA adapters on the image encoder's linear layers, and merging them back into plain weights.

A :class:`LoRALinear` *is* an ``nn.Linear`` (same ``weight`` / ``bias`` names) with two extra
parameters, ``lora_A`` (r x in) and ``lora_B`` (out x r), computing
``x W^T + b + (alpha / r) dropout(x) A^T B^T``. ``B`` starts at zero, so an adapted model starts as
the original. A training checkpoint of a LoRA run therefore holds every official key plus
``*.lora_A`` / ``*.lora_B``; :func:`merge_lora` folds ``W += (alpha / r) B A`` and turns the layers
back into ``nn.Linear``, giving a state dict that :func:`medsam.load_model` reads.

Why not the ``peft`` library: it pulls in ``transformers``, ``accelerate`` and ``huggingface_hub``
for what is a 60-line module here, renames the wrapped layers' keys (``base_layer.weight``) and
needs its own model wrapper around ours.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update. Build with :meth:`from_linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap ``linear``, sharing its weight and bias tensors."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            device=w.device,
            dtype=w.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return out + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scaling B A`` (computed in float64, then cast)."""
        w = self.weight.detach()
        delta = (self.lora_B.detach().double() @ self.lora_A.detach().double()) * self.scaling
        plain = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            plain.weight.copy_((w.double() + delta).to(w.dtype))
            if self.bias is not None:
                plain.bias.copy_(self.bias.detach())
        return plain


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def lora_target_names(encoder: nn.Module, targets: list[str]) -> list[str]:
    """Names (inside ``encoder``) of the ``nn.Linear`` layers whose name ends with a target.

    A target matches on whole name components: ``attn.qkv`` matches ``blocks.3.attn.qkv``.
    """
    names = []
    for name, module in encoder.named_modules():
        is_plain_linear = isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
        if is_plain_linear and any(re.search(r"(^|\.)" + re.escape(t) + r"$", name) for t in targets):
            names.append(name)
    return names


def apply_lora(encoder: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Replace the target linear layers of ``encoder`` by :class:`LoRALinear`, in place.

    Returns the adapted layer names; raises ValueError if no layer matches.
    """
    names = lora_target_names(encoder, targets)
    if not names:
        raise ValueError(f"no nn.Linear layer of the image encoder matches the LoRA targets {targets}")
    for name in names:
        _set_submodule(encoder, name, LoRALinear.from_linear(encoder.get_submodule(name), rank, alpha, dropout))
    return names


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.endswith(("lora_A", "lora_B"))]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` inside ``module`` into a plain ``nn.Linear``, in place."""
    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoRALinear):
            _set_submodule(module, name, sub.merged())
    return module


def has_lora(state: dict) -> bool:
    """Whether a state dict holds LoRA adapter tensors."""
    return any(k.endswith((".lora_A", ".lora_B")) for k in state)
