"""``medsam info``: a checkpoint's architecture, preprocessing contract and size."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "run"]


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: architecture, contract, parameters")
    p.add_argument("checkpoint", nargs="?", default=None, help="weights file (default: the embedded model)")
    p.add_argument("--arch", default=None, help="the architecture when the tensors do not tell (e.g. medsam2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..weights import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.checkpoint, device="cpu", arch=args.arch)
    n = sum(p.numel() for p in model.parameters())
    encoder = model.config.encoder
    family = {"hiera": "SAM2 family", "vit3d": "SAM-Med3D, native 3D"}.get(encoder, "SAM / MedSAM family")
    unit = "voxel cube" if encoder == "vit3d" else "px"
    print(f"architecture: {model.config.name} ({encoder} encoder, {family}), input {model.input_size} {unit}")
    threshold = getattr(model, "mask_threshold", None)
    print(f"contract: {model.contract}" + ("" if threshold is None else f", mask threshold {threshold:g} (calibrated)"))
    print(f"parameters: {n / 1e6:.1f} M")
    if getattr(model, "is_untrained_default", False):
        print("weights: random (no trained default model bundled)")
    return 0
