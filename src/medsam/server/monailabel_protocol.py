"""The MONAI Label wire protocol as pure functions: an infer request's prompts, the multipart
answer, and the label names a client shows.

Coordinates. MONAI Label clients (3D Slicer's MONAILabel module, OHIF's plugin, MONAI Label's
Python client) send voxel indices of the image file as the server stores it: a click is
``[i, j, k]`` (Slicer's IJK: ``i`` the column ``x``, ``j`` the row ``y``, ``k`` the slice), which
in a ``(Z, Y, X)`` array is ``v[k, j, i]``; a region of interest is ``[i0, i1, j0, j1, k0, k1]``
(inclusive indices, each pair in either order). A 2D image is one slice: ``k`` is 0.

What an infer request's ``params`` may hold (everything else is ignored, as MONAI Label's own
tasks ignore keys they do not know): ``foreground`` / ``background`` (lists of clicks), ``roi``,
``slice`` (the slice a 2D model works on), ``label`` (the segment's name, echoed back in
``label_names``), ``result_extension`` (``.nii.gz`` (default), ``.nii``, ``.nrrd``, ``.mha``).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RESULT_SUFFIXES",
    "Click",
    "InferPrompt",
    "ParamsRefused",
    "label_names",
    "multipart_body",
    "parse_infer_params",
    "plan_slice",
]

RESULT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_MAX_CLICKS = 1000


class ParamsRefused(ValueError):
    """An infer request whose params cannot be used (answered with 422)."""


@dataclass(frozen=True)
class Click:
    """One click: voxel ``(x, y, z)`` = ``(i, j, k)``; ``positive`` for foreground."""

    x: int
    y: int
    z: int
    positive: bool


@dataclass(frozen=True)
class InferPrompt:
    """The prompts of one infer request, checked against the image.

    Attributes:
        clicks: foreground then background clicks, in the order sent.
        roi: ``(x0, y0, z0, x1, y1, z1)`` inclusive, ordered and clipped to the image; or None.
        slice: the slice the client named (``params["slice"]``), or None.
        label: the segment's name.
        result_suffix: the file type of the answer.
    """

    clicks: tuple[Click, ...]
    roi: tuple[int, int, int, int, int, int] | None
    slice: int | None
    label: str
    result_suffix: str

    @property
    def positive(self) -> list[Click]:
        return [c for c in self.clicks if c.positive]


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamsRefused(f"{what} must be a finite number, got {json.dumps(value)[:40]}")
    return int(round(value))


def _clicks(raw: Any, positive: bool, shape_zyx: tuple[int, int, int]) -> list[Click]:
    name = "foreground" if positive else "background"
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ParamsRefused(f"{name} must be a list of [i, j, k] voxel indices")
    if len(raw) > _MAX_CLICKS:
        raise ParamsRefused(f"{name}: at most {_MAX_CLICKS} clicks")
    depth, height, width = shape_zyx
    out = []
    for point in raw:
        if not isinstance(point, list) or len(point) not in (2, 3):
            raise ParamsRefused(f"{name}: each click is [i, j, k] (or [i, j] on a 2D image)")
        x, y = _integer(point[0], f"{name} i"), _integer(point[1], f"{name} j")
        z = _integer(point[2], f"{name} k") if len(point) == 3 else 0
        if not (0 <= x < width and 0 <= y < height and 0 <= z < depth):
            raise ParamsRefused(f"{name} click {[x, y, z]} lies outside the image of size [{width}, {height}, {depth}]")
        out.append(Click(x, y, z, positive))
    return out


def _roi(raw: Any, shape_zyx: tuple[int, int, int]) -> tuple[int, int, int, int, int, int] | None:
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list) or len(raw) != 6:
        raise ParamsRefused("roi must be [i0, i1, j0, j1, k0, k1] (voxel indices)")
    i0, i1, j0, j1, k0, k1 = (_integer(v, "roi") for v in raw)
    depth, height, width = shape_zyx
    lo = (max(min(i0, i1), 0), max(min(j0, j1), 0), max(min(k0, k1), 0))
    hi = (min(max(i0, i1), width - 1), min(max(j0, j1), height - 1), min(max(k0, k1), depth - 1))
    if any(a > b for a, b in zip(lo, hi)):
        raise ParamsRefused(f"roi {raw} does not overlap the image of size [{width}, {height}, {depth}]")
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def parse_infer_params(params: Any, shape_zyx: tuple[int, int, int], default_label: str) -> InferPrompt:
    """Check an infer request's ``params`` against an image of ``shape_zyx`` (``(1, H, W)`` for a
    2D image); raises :class:`ParamsRefused` naming the first problem."""
    if not isinstance(params, dict):
        raise ParamsRefused("params must be a JSON object")
    clicks = _clicks(params.get("foreground"), True, shape_zyx) + _clicks(params.get("background"), False, shape_zyx)
    roi = _roi(params.get("roi"), shape_zyx)
    raw_slice = params.get("slice")
    index = None
    if raw_slice is not None:
        index = _integer(raw_slice, "slice")
        if not 0 <= index < shape_zyx[0]:
            raise ParamsRefused(f"slice {index} is outside 0..{shape_zyx[0] - 1}")
    label = params.get("label", default_label)
    if not isinstance(label, str) or not label or len(label) > 200 or not label.isprintable():
        raise ParamsRefused("label must be a printable name of at most 200 characters")
    suffix = params.get("result_extension", ".nii.gz")
    if suffix not in RESULT_SUFFIXES:
        raise ParamsRefused(f"result_extension must be one of {', '.join(RESULT_SUFFIXES)}")
    return InferPrompt(tuple(clicks), roi, index, label, suffix)


def plan_slice(prompt: InferPrompt) -> tuple[int, tuple[int, int, int, int] | None, list[tuple[int, int, bool]]]:
    """What a 2D model segments: ``(slice, box (x0, y0, x1, y1) or None, points (x, y, positive))``.

    The slice is the one the client named, else that of the last foreground click, else the
    middle of the region of interest; the box is the region's ``x``/``y`` extent; the points are
    the clicks on that slice. Raises :class:`ParamsRefused` when neither a region nor a
    foreground click on the slice is left.
    """
    positive = prompt.positive
    if prompt.slice is not None:
        index = prompt.slice
    elif positive:
        index = positive[-1].z
    elif prompt.roi is not None:
        index = (prompt.roi[2] + prompt.roi[5]) // 2
    else:
        raise ParamsRefused("give a region of interest (roi) or a foreground click")
    box = None if prompt.roi is None else (prompt.roi[0], prompt.roi[1], prompt.roi[3], prompt.roi[4])
    points = [(c.x, c.y, c.positive) for c in prompt.clicks if c.z == index]
    if box is None and not any(p[2] for p in points):
        raise ParamsRefused(f"no region of interest and no foreground click on slice {index}")
    return index, box, points


def label_names(definitions: list[dict[str, Any]]) -> dict[str, int]:
    """``{name: value}`` ordered by value (the ``label_names`` MONAI Label clients read)."""
    out: dict[str, int] = {}
    for d in sorted(definitions, key=lambda d: int(d.get("value", 0))):
        out.setdefault(str(d.get("name") or f"label {d.get('value')}"), int(d.get("value", 0)))
    return out


def multipart_body(params: dict[str, Any], filename: str, data: bytes) -> tuple[str, bytes]:
    """``(content type, body)`` of a ``multipart/form-data`` answer: a ``params`` JSON part and
    the result file under ``filename`` (what MONAI Label's infer answers by default)."""
    boundary = "medsam-" + secrets.token_hex(16)
    if any(c in filename for c in '"\\/\r\n'):
        raise ValueError("unsafe result file name")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n'
        f"Content-Type: application/json\r\n\r\n{json.dumps(params)}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", head + data + tail
