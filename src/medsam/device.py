"""Choosing the torch device: CUDA, then Apple MPS, then CPU, unless the user names one."""

from __future__ import annotations

import os

import torch


def pick_device(preference: str | torch.device | None = None) -> torch.device:
    """Return ``preference`` as a device, or the best available one.

    The environment variable ``MEDSAM_DEVICE`` overrides the automatic choice.
    Raises ValueError if a named device is not available.
    """
    if preference is None:
        preference = os.environ.get("MEDSAM_DEVICE") or None
    if preference is None or str(preference) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but is not available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("MPS was requested but is not available")
    return device
