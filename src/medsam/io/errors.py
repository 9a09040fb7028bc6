"""Errors raised by :mod:`medsam.io`."""

from __future__ import annotations


class ImageReadError(ValueError):
    """A file or folder could not be read as a medical image.

    The message names the file and gives one short reason; the underlying
    library exception, when there is one, is kept as ``__cause__``.
    """
