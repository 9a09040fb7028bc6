"""Import the reference ``segment-anything==1.0`` package as a test oracle.

The package imports torchvision for resize helpers and NMS only; torchvision from PyPI does not
import beside the local CPU torch, so an inert stub is registered. Its ``resize`` and
``to_pil_image`` do exactly what torchvision does for a uint8 HWC numpy image: a PIL bilinear
resize (this is what ``SamPredictor.set_image`` runs).
"""

from __future__ import annotations

import sys
import types

import numpy as np


def _install_torchvision_stub() -> None:
    if "torchvision" in sys.modules:
        return
    from PIL import Image

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")

    def to_pil_image(array):
        return Image.fromarray(np.asarray(array))

    def resize(img, size):
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stub: not available in tests")

    class _Unavailable:  # sam2's image transforms: imported, never built in the tests
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stub: not available in tests")

    functional.to_pil_image = to_pil_image
    functional.resize = resize
    transforms.functional = functional
    transforms.Normalize = transforms.Resize = transforms.ToTensor = _Unavailable
    boxes.batched_nms = _unavailable
    boxes.box_area = _unavailable
    ops.boxes = boxes
    tv.transforms = transforms
    tv.ops = ops
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.boxes": boxes,
        }
    )


def import_reference():
    """Return the ``segment_anything`` module (with the stub installed)."""
    _install_torchvision_stub()
    import segment_anything

    return segment_anything


def build_reference(kind: str = "vit_b", seed: int = 0):
    """A reference SAM model with seeded random weights (incl. the normally-zero rel-pos tables)."""
    import torch

    sa = import_reference()
    torch.manual_seed(seed)
    model = sa.sam_model_registry[kind]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "token" in name:
                p.normal_(0, 0.02)
            elif p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
