"""Errors raised by several layers of the package (the predictor, strokes, volumes, the server)."""

from __future__ import annotations

__all__ = ["PromptError"]


class PromptError(ValueError):
    """A prompt that does not fit the image (outside it, empty, wrong shape, NaN)."""
