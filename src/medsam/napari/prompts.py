"""Prompts out of napari layers: a Shapes layer's rectangles and Points layers' points, mapped into
the image layer's pixel grid.

napari keeps a layer's ``data`` in its own data coordinates (axis order ``(z, y, x)`` for a
volume, ``(y, x)`` for a 2D image); two layers with different scale or translate meet in world
coordinates, so each vertex goes ``shapes.data_to_world`` -> ``image.world_to_data``. A rectangle
drawn on a volume has one ``z`` (the slice it was drawn on); its box is the rounded extent of its
vertices, inclusive pixels ``(x0, y0, x1, y1)`` clipped to the slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["boxes_from_shapes", "points_by_slice", "voxel_clicks"]


def _to_image_pixels(vertices: np.ndarray, source: Any, image: Any) -> np.ndarray:
    """``(N, D)`` data coordinates of ``source`` -> the image layer's data coordinates."""
    out = []
    for v in np.asarray(vertices, dtype=np.float64):
        world = source.data_to_world(v)
        out.append(np.asarray(image.world_to_data(world), dtype=np.float64))
    return np.asarray(out).reshape(len(out), -1)


def _spatial(image: Any) -> tuple[int, ...]:
    shape = tuple(int(n) for n in np.shape(image.data))
    return shape[:-1] if getattr(image, "rgb", False) else shape


def boxes_from_shapes(shapes: Any, image: Any) -> list[tuple[int, tuple[int, int, int, int]]]:
    """``[(slice, (x0, y0, x1, y1)), ...]`` of the rectangles in ``shapes`` (other shape types are
    skipped), in drawing order. Raises ValueError for a rectangle outside the image or one that
    spans several slices."""
    spatial = _spatial(image)
    height, width = spatial[-2:]
    out = []
    for vertices, kind in zip(shapes.data, shapes.shape_type):
        if kind != "rectangle":
            continue
        pixels = _to_image_pixels(vertices, shapes, image)
        if len(spatial) == 3:
            zs = np.unique(np.round(pixels[:, -3]).astype(int))
            if len(zs) != 1:
                raise ValueError("a rectangle must lie on one slice (draw it in a 2D view)")
            index = int(zs[0])
            if not 0 <= index < spatial[0]:
                raise ValueError(f"a rectangle lies on slice {index}, outside the volume")
        else:
            index = 0
        ys, xs = pixels[:, -2], pixels[:, -1]
        x0, x1 = max(int(np.round(xs.min())), 0), min(int(np.round(xs.max())), width - 1)
        y0, y1 = max(int(np.round(ys.min())), 0), min(int(np.round(ys.max())), height - 1)
        if x0 > x1 or y0 > y1:
            raise ValueError("a rectangle lies outside the image")
        out.append((index, (x0, y0, x1, y1)))
    return out


def points_by_slice(image: Any, foreground: Any, background: Any = None) -> dict[int, list[tuple[float, float, bool]]]:
    """``{slice: [(x, y, positive), ...]}`` from a foreground Points layer and an optional
    background one; points outside the image are refused (ValueError)."""
    spatial = _spatial(image)
    height, width = spatial[-2:]
    out: dict[int, list[tuple[float, float, bool]]] = {}
    for layer, positive in ((foreground, True), (background, False)):
        if layer is None or len(layer.data) == 0:
            continue
        for p in _to_image_pixels(layer.data, layer, image):
            index = int(np.round(p[-3])) if len(spatial) == 3 else 0
            y, x = float(p[-2]), float(p[-1])
            if not (0 <= index < (spatial[0] if len(spatial) == 3 else 1) and -0.5 <= x < width and -0.5 <= y < height):
                raise ValueError(f"a point at (x={x:.1f}, y={y:.1f}, slice {index}) lies outside the image")
            out.setdefault(index, []).append((x, y, positive))
    return out


def voxel_clicks(image: Any, foreground: Any, background: Any = None) -> list[tuple[tuple[int, int, int], bool]]:
    """``[((i, j, k), positive), ...]`` voxel clicks of a volume (``i`` the column, ``k`` the slice:
    ``array[k, j, i]``) from a foreground Points layer and an optional background one: the
    foreground points in their layer's order, then the background ones (SAM-Med3D decodes clicks
    in this order). Points outside the volume are refused (ValueError)."""
    spatial = _spatial(image)
    if len(spatial) != 3 or getattr(image, "rgb", False):
        raise ValueError("voxel clicks need a grey volume")
    out = []
    for layer, positive in ((foreground, True), (background, False)):
        if layer is None or len(layer.data) == 0:
            continue
        for p in _to_image_pixels(layer.data, layer, image):
            k, j, i = (int(np.round(v)) for v in p[-3:])
            if not (0 <= k < spatial[0] and 0 <= j < spatial[1] and 0 <= i < spatial[2]):
                raise ValueError(f"a point at voxel (i={i}, j={j}, k={k}) lies outside the volume")
            out.append(((i, j, k), positive))
    return out
