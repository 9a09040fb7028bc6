"""The names of the preprocessing contracts, importable without torch (the command line's choices).

What each contract does is :class:`medsam.preprocess.Contract`.
"""

from __future__ import annotations

__all__ = ["CONTRACT_NAMES", "ONNX_CONTRACT_NAMES"]

CONTRACT_NAMES = ("medsam", "sam", "lite", "sam2", "medsam2")
# The contracts an ONNX export carries (the SAM2 family is not exported).
ONNX_CONTRACT_NAMES = ("medsam", "sam", "lite")
