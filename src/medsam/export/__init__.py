"""Deployment formats: ONNX export with the preprocessing contract, and an onnxruntime predictor.

    from medsam.export import export_onnx, OnnxPredictor

    export_onnx(model, "out", quantize="int8")      # encoder.onnx, decoder*.onnx, medsam_onnx.json
    predictor = OnnxPredictor("out")                 # same set_image / predict as medsam.Predictor

Needs the ``export`` extra (onnx, onnxscript, onnxruntime); nothing is imported until used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "medsam.export.onnx",
    "ExportResult": "medsam.export.onnx",
    "ExportError": "medsam.export.onnx",
    "quantize_int8": "medsam.export.onnx",
    "OnnxPredictor": "medsam.export.runtime",
    "load_export_metadata": "medsam.export.runtime",
    "pack_point_prompts": "medsam.export.runtime",
    "contract_spec": "medsam.export.contract",
    "check_contract_spec": "medsam.export.contract",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medsam.export' has no attribute {name!r}")
