"""MedSAM: Segment Anything for medical images.

Public entry points (imported lazily, so ``import medsam`` does no work)::

    model = medsam.load_model("medsam_vit_b.pth")
    predictor = medsam.Predictor(model)
    predictor.set_image(image)
    result = predictor.predict(boxes=[[x0, y0, x1, y1]])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "load_model": "medsam.weights",
    "save_model": "medsam.weights",
    "build_model": "medsam.model.registry",
    "Predictor": "medsam.predictor",
    "Prediction": "medsam.predictor",
    "masks_to_label_map": "medsam.predictor",
    "get_contract": "medsam.preprocess",
    "segment_volume": "medsam.volume",
    "segment_npz_case": "medsam.volume",
    "Box3D": "medsam.volume",
    "Box2D": "medsam.volume",
    "VolumeSegmentation": "medsam.volume",
    "EmbeddingCache": "medsam.embedding_cache",
    "segment_file": "medsam.segment",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medsam' has no attribute {name!r}")
