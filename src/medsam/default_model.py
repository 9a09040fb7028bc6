"""The embedded default model used when no checkpoint is named.

The package ships trained weights at ``medsam/data/default_model.safetensors``
(:func:`bundled_checkpoint`; :func:`medsam.load_model` with no path loads them). A source tree
without them falls back to a small model with seeded random weights (:func:`untrained_default`),
and every use of it warns that its masks are meaningless.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .model.sam import MedSAMModel

UNTRAINED_WARNING = (
    "No trained default weights are bundled: using a randomly initialised model. "
    "Its masks are meaningless; pass --checkpoint / load_model(PATH) with real weights "
    "(e.g. medsam_vit_b.pth)."
)


def bundled_checkpoint() -> Path | None:
    """Path of the bundled trained weights, or None when the package has none."""
    path = Path(str(resources.files("medsam") / "data" / "default_model.safetensors"))
    return path if path.is_file() else None


def untrained_default(contract: str | None = None, device: torch.device | str | None = None) -> MedSAMModel:
    """The stand-in when no weights are bundled: the small ``vit_tiny`` model with seed-0 random
    weights (the global random state is left as it was), marked ``is_untrained_default``. The
    caller warns (:data:`UNTRAINED_WARNING`)."""
    from .model.registry import build_model

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = build_model("vit_tiny", contract=contract)
    finally:
        torch.random.set_rng_state(generator_state)
    model.is_untrained_default = True
    return model.to(device or "cpu").eval()
