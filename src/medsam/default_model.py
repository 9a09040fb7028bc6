"""The embedded default model used when no checkpoint is named.

The package ships trained weights at ``medsam/data/default_model.safetensors`` once the demo-model
work has produced them. Until then (or in a source tree without them) the default is a small
LiteMedSAM-shaped model with seeded random weights, and every use of it warns that its masks are
meaningless.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import torch

UNTRAINED_WARNING = (
    "No trained default weights are bundled: using a randomly initialised model. "
    "Its masks are meaningless; pass --checkpoint / load_model(PATH) with real weights "
    "(e.g. medsam_vit_b.pth)."
)


def bundled_checkpoint() -> Path | None:
    """Path of the bundled trained weights, or None when the package has none."""
    path = Path(str(resources.files("medsam") / "data" / "default_model.safetensors"))
    return path if path.is_file() else None


def load_default_model(contract: str | None = None, device: torch.device | None = None):
    """Load the bundled weights, or (with a warning) a seeded random small model."""
    from .model.registry import build_model
    from .weights import load_model

    path = bundled_checkpoint()
    if path is not None:
        model = load_model(path, contract=contract, device=device)
        # Meant for laptops: a Predictor runs its encoder in bfloat16 where the CPU has it
        # (masks agree with float32 on >= 99 % of pixels: docs/performance.md).
        model.preferred_precision = "auto"
        return model
    warnings.warn(UNTRAINED_WARNING, stacklevel=3)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = build_model("vit_tiny", contract=contract)
    finally:
        torch.random.set_rng_state(generator_state)
    model.is_untrained_default = True
    return model.to(device or "cpu").eval()
