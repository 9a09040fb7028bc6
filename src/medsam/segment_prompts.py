"""Prompts of one input, checked before a model is loaded: boxes (clipped to the image with a
warning), clicks for one object, and the prompts of a volume or video
(:class:`~medsam.volume.Box3D`, :class:`~medsam.volume.Box2D`, :class:`~medsam.volume.Clicks2D`).
Used by :func:`medsam.segment.segment_file` and :func:`medsam.segment_video.segment_video`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .prompt_checks import clip_boxes

__all__ = ["checked_clicks", "clipped", "parse_boxes", "volume_prompts"]


def parse_boxes(values: Sequence[Sequence[float]], width: int) -> np.ndarray:
    boxes = np.asarray(values, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != width:
        raise ValueError(f"each box needs {width} numbers")
    return boxes


def clipped(boxes: np.ndarray, size: tuple[int, int], inclusive: bool = False) -> np.ndarray:
    """Boxes clipped to the image (a warning names each one that overhung its edge); ``inclusive``
    as in :func:`medsam.prompt_checks.clip_boxes`."""
    clipped, changed = clip_boxes(boxes, size, inclusive)
    for i in np.flatnonzero(changed):
        before = ", ".join(f"{v:g}" for v in boxes[i])
        after = ", ".join(f"{v:g}" for v in clipped[i])
        warnings.warn(f"box {i + 1} [{before}] overhangs the image edge; clipped to [{after}]", stacklevel=3)
    return clipped


def checked_clicks(
    points: Sequence[tuple[float, float, bool]], n_boxes: int, size: tuple[int, ...]
) -> list[tuple[float, float, bool]]:
    """Clicks for one object: at most one box with them, a foreground click unless a box is
    given, every click on the (H, W) slice."""
    clicks = [(float(x), float(y), bool(positive)) for x, y, positive in points]
    if not clicks:
        return clicks
    if n_boxes > 1:
        raise ValueError("clicks prompt one object: give at most one box with --point / --negative-point")
    if not n_boxes and not any(positive for _, _, positive in clicks):
        raise ValueError("give a foreground click (--point X Y), or a box, with background clicks")
    H, W = int(size[0]), int(size[1])
    for x, y, _ in clicks:
        if not (-0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5):
            raise ValueError(f"click ({x:g}, {y:g}) lies outside the {W} x {H} image")
    return clicks


def volume_prompts(
    boxes: Sequence[Sequence[float]],
    key_slice: int | None,
    shape: tuple[int, ...],
    unit: str = "slice",
    points: Sequence[tuple[float, float, bool]] = (),
) -> list[Any]:
    """The prompts (:class:`~medsam.volume.Box3D` / :class:`~medsam.volume.Box2D`) of a volume,
    or of a video (``unit="frame"``), of ``shape`` ``(Z, Y, X)``: 3D boxes
    ``[x0, y0, z0, x1, y1, z1]``, or 2D boxes ``[x0, y0, x1, y1]`` on ``key_slice``; clipped to
    the volume with a warning, ValueError when they cannot be used."""
    from .volume import Box2D, Box3D, Clicks2D

    Z, Y, X = (int(n) for n in shape[:3])
    whole = "volume" if unit == "slice" else "video"
    if points:  # one object clicked on the key slice, with at most one 2D box
        if any(len(b) != 4 for b in boxes):
            raise ValueError(f"clicks on a {whole} go with --slice K and at most one 2D box (X0 Y0 X1 Y1)")
        clicks = checked_clicks(points, len(boxes), (Y, X))
        if key_slice is None:
            raise ValueError(f"clicks on a {whole} need --slice K, the {unit} they are on")
        if not 0 <= key_slice < Z:
            raise ValueError(f"--slice {key_slice} lies outside the {whole}'s {Z} {unit}s")
        box = None
        if boxes:
            x0, y0, x1, y1 = clipped(parse_boxes(boxes, 4), (Y, X), inclusive=True)[0]
            box = (int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
        xy = tuple((x, y) for x, y, _ in clicks)
        return [Clicks2D(xy, tuple(int(p) for _, _, p in clicks), key_slice, box)]
    if not boxes:
        raise ValueError("give at least one box: --box X0 Y0 Z0 X1 Y1 Z1, or --box X0 Y0 X1 Y1 --slice K")
    widths = {len(b) for b in boxes}
    prompts: list[Any] = []
    if widths == {6}:
        if key_slice is not None:
            raise ValueError("--slice goes with 2D boxes (X0 Y0 X1 Y1), not with 3D boxes")
        b6 = parse_boxes(boxes, 6)
        b6[:, [0, 1, 3, 4]] = clipped(b6[:, [0, 1, 3, 4]], (Y, X), inclusive=True)
        for i, (x0, y0, z0, x1, y1, z1) in enumerate(b6):
            lo, hi = max(z0, 0.0), min(z1, Z - 1.0)
            if hi < lo:
                raise ValueError(f"box {i + 1}: z-range [{z0:g}, {z1:g}] lies outside the {whole}'s {Z} {unit}s")
            if (lo, hi) != (z0, z1):
                warnings.warn(
                    f"box {i + 1}: z-range [{z0:g}, {z1:g}] overhangs the {whole}; clipped to [{lo:g}, {hi:g}]",
                    stacklevel=3,
                )
            prompts.append(Box3D(*[int(round(v)) for v in (x0, y0, lo, x1, y1, hi)]))
    elif widths == {4}:
        if key_slice is None:
            raise ValueError(f"2D boxes on a {whole} need --slice K (or give 3D boxes X0 Y0 Z0 X1 Y1 Z1)")
        if not 0 <= key_slice < Z:
            raise ValueError(f"--slice {key_slice} lies outside the {whole}'s {Z} {unit}s")
        b4 = clipped(parse_boxes(boxes, 4), (Y, X), inclusive=True)
        prompts = [
            Box2D(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)), slice=key_slice)
            for x0, y0, x1, y1 in b4
        ]
    else:
        raise ValueError(f"boxes on a {whole} need 6 numbers (X0 Y0 Z0 X1 Y1 Z1) or 4 with --slice")
    return prompts
