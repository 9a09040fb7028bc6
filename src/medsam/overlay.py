"""Overlay pictures: an image with coloured masks and the prompt boxes drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Distinct colours for labels 1..N (cycled).
PALETTE = np.array(
    [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
    ],
    dtype=np.float32,
)


def render_overlay(
    image_rgb: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend label colours over an (H, W, 3) uint8 image; returns (H, W, 3) uint8.

    ``labels``: (H, W) integers, 0 = background. ``boxes``: (N, 4) [x0, y0, x1, y1] drawn as
    outlines in the colour of label i + 1.
    """
    from PIL import Image, ImageDraw

    out = image_rgb.astype(np.float32).copy()
    for lab in np.unique(labels):
        if lab == 0:
            continue
        colour = PALETTE[(int(lab) - 1) % len(PALETTE)]
        sel = labels == lab
        out[sel] = (1 - alpha) * out[sel] + alpha * colour
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if boxes is not None:
        draw = ImageDraw.Draw(picture)
        for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=float)):
            colour = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=max(1, min(image_rgb.shape[:2]) // 256))
    return np.asarray(picture)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 picture as PNG atomically."""
    from PIL import Image

    from .io.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path
