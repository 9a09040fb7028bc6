"""Volume prompts and the walk each one starts (used by :mod:`medsam.volume`).

This module owns the boxes a user gives for a volume, :class:`Box3D` and :class:`Box2D`, their
checks against the slicing frame, and what each becomes for propagation: a :class:`Track` with
its key slice, the slice range it may walk, its in-plane limit, its IoU stop and its end reason,
and the rule for the next slice's box (:func:`next_box`). The walk itself (sweeps, embeddings,
decoding, the label map) is :func:`medsam.volume.segment_volume`; the axis and coordinate
conventions are those of the :mod:`medsam.volume` docstring (``x`` columns, ``y`` rows, ``z``
the slicing axis; corners are inclusive voxel indices). ``Box3D``, ``Box2D`` and
``BOX2D_IOU_THRESHOLD`` are public as ``medsam.volume.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PromptError

__all__ = ["BOX2D_IOU_THRESHOLD", "Box2D", "Box3D", "Clicks2D", "KeyBoxes", "KeyMasks", "Mask2D"]

# A zoom window ``(y0, y1, x0, x1)`` (:func:`medsam.zoom.zoom_window`), exclusive ends.
ZoomWindow = tuple[int, int, int, int]
# A mask prompt carried to the next slice: ((1, L, L) float32 low-res logits, the zoom window
# they were predicted on, or None for whole-slice logits).
MaskPrompt = tuple[np.ndarray, ZoomWindow | None]
# The next step of a walk: ((4,) predictor box, mask prompt or None).
Step = tuple[np.ndarray, MaskPrompt | None]
# A kept slice of an object: (y0, x0, (h, w) bool mask crop, (h, w) float32 score crop or None).
KeptCrop = tuple[int, int, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class Box3D:
    """A 3D box, inclusive voxel indices in the slicing frame (``x`` columns, ``y`` rows, ``z``
    slices; with ``axis=0``: x = i, y = j, z = k of a ``(Z, Y, X)`` array ``v[k, j, i]``).

    The object is segmented on slices ``z0..z1`` at most; the key slice is ``(z0 + z1) // 2``
    unless overridden, and is prompted with ``[x0, y0, x1, y1]``.
    """

    x0: int
    y0: int
    z0: int
    x1: int
    y1: int
    z1: int

    @classmethod
    def from_array(cls, values: Sequence[float] | np.ndarray) -> Box3D:
        """From ``[x0, y0, z0, x1, y1, z1]`` (the CVPR 2024 npz layout)."""
        return cls(*(as_int(v) for v in np.asarray(values, dtype=np.float64).reshape(6)))


@dataclass(frozen=True)
class Box2D:
    """A 2D box ``[x0, y0, x1, y1]`` (inclusive pixels, x = columns, y = rows) on key slice
    ``slice`` (index along the slicing axis). Propagation may run to both ends of the volume."""

    x0: int
    y0: int
    x1: int
    y1: int
    slice: int


@dataclass(frozen=True)
class KeyBoxes:
    """One object drawn on several key slices: ``boxes[i]`` (``[x0, y0, x1, y1]``, inclusive
    pixels) on slice ``slices[i]``.

    Each key slice owns the slices nearer to it than to any other key (a slice half-way between
    two keys goes to the lower one); the object is walked from each key through the slices it
    owns. Between two keys the object is known to continue, so those walks stop only where the
    mask vanishes; beyond the outermost keys the walks run as a :class:`Box2D`'s do (IoU stop,
    the volume's ends).
    """

    boxes: tuple[tuple[int, int, int, int], ...]
    slices: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.slices) or not self.boxes:
            raise PromptError(f"KeyBoxes needs one box per key slice, got {len(self.boxes)} and {len(self.slices)}")
        object.__setattr__(self, "slices", tuple(as_int(k) for k in self.slices))
        if len(set(self.slices)) != len(self.slices):
            raise PromptError(f"KeyBoxes: a slice is given twice: {list(self.slices)}")
        for box in self.boxes:
            if len(box) != 4:
                raise PromptError(f"KeyBoxes: a box is [x0, y0, x1, y1], got {list(box)}")

    @classmethod
    def from_boxes(cls, boxes: Sequence[Box2D]) -> KeyBoxes:
        """The 2D boxes of one object on its key slices."""
        return cls(tuple((b.x0, b.y0, b.x1, b.y1) for b in boxes), tuple(b.slice for b in boxes))


def as_int(v: Any) -> int:
    f = float(v)
    if not np.isfinite(f):
        raise PromptError(f"box coordinate is not finite: {v!r}")
    r = int(round(f))
    if abs(f - r) > 1e-6:
        raise PromptError(f"box coordinates must be integer voxel indices, got {v!r}")
    return r


@dataclass(frozen=True)
class Clicks2D:
    """One object clicked on key slice ``slice``: ``points`` ``((x, y), ...)`` (pixels, x =
    column) with ``labels`` 1 (foreground) / 0 (background), and optionally a box
    ``(x0, y0, x1, y1)`` (inclusive) given with them.

    A SAM2-family model tracks the object from these prompts with memory; a MedSAM / SAM model
    segments the key slice from them and walks the object from that mask's box, the key slice
    keeping the clicks' mask (:func:`resolve_clicks`).
    """

    points: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]
    slice: int
    box: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        pts = np.asarray(self.points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or not np.all(np.isfinite(pts)):
            raise PromptError("Clicks2D needs at least one finite (x, y) point")
        if len(self.labels) != len(pts) or any(int(v) not in (0, 1) for v in self.labels):
            raise PromptError("Clicks2D needs one label per point, 1 (foreground) or 0 (background)")
        if self.box is None and not any(int(v) == 1 for v in self.labels):
            raise PromptError("Clicks2D needs a foreground click (or a box)")
        object.__setattr__(self, "points", tuple((float(x), float(y)) for x, y in pts))
        object.__setattr__(self, "labels", tuple(int(v) for v in self.labels))
        object.__setattr__(self, "slice", as_int(self.slice))
        if self.box is not None:
            object.__setattr__(self, "box", tuple(as_int(v) for v in self.box))

    def check(self, S: int, H: int, W: int, what: str) -> None:
        """PromptError unless the slice, the points and the box lie inside an (S, H, W) volume."""
        if not 0 <= self.slice < S:
            raise PromptError(f"{what}: slice {self.slice} outside 0..{S - 1}")
        for x, y in self.points:
            if not (-0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5):
                raise PromptError(f"{what}: click ({x:g}, {y:g}) outside the {W} x {H} slice")
        if self.box is not None:
            check_inplane(*self.box, H, W, what)

    def network_points(self, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
        """``(coords (P, 2), labels (P,))`` as SAM encodes them: the box's corners first (labels
        2, 3), then the clicks."""
        coords = [list(p) for p in self.points]
        labels = list(self.labels)
        if self.box is not None:
            x0, y0, x1, y1 = prompt_box(*self.box, H, W)
            coords = [[x0, y0], [x1, y1], *coords]
            labels = [2, 3, *labels]
        return np.asarray(coords, dtype=np.float64), np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Mask2D:
    """One object given by its mask ``(H, W)`` (non-zero = object) on key slice ``slice``.

    A SAM2-family model takes the mask itself as the key slice's result and tracks it with memory
    (SAM2's mask prompt); a MedSAM / SAM model walks the object from the mask's box, the key slice
    keeping the mask (:func:`resolve_clicks`).
    """

    mask: np.ndarray
    slice: int

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or not mask.any():
            raise PromptError("Mask2D needs a non-empty (H, W) mask")
        object.__setattr__(self, "mask", mask != 0)
        object.__setattr__(self, "slice", as_int(self.slice))

    def check(self, S: int, H: int, W: int, what: str) -> None:
        if not 0 <= self.slice < S:
            raise PromptError(f"{what}: slice {self.slice} outside 0..{S - 1}")
        if self.mask.shape != (H, W):
            raise PromptError(f"{what}: mask of shape {self.mask.shape} on slices of {(H, W)}")


@dataclass(frozen=True, eq=False)
class KeyMasks:
    """One object given by its masks on several key slices: ``masks[i]`` ``(H, W)`` on slice
    ``slices[i]``. Tracked by SAM2-family models (each mask a prompted slice, as
    :class:`KeyBoxes` for boxes); MedSAM / SAM models take :class:`KeyBoxes` instead."""

    masks: tuple[np.ndarray, ...]
    slices: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.masks) != len(self.slices) or not self.masks:
            raise PromptError(f"KeyMasks needs one mask per key slice, got {len(self.masks)} and {len(self.slices)}")
        slices = tuple(as_int(k) for k in self.slices)
        if len(set(slices)) != len(slices):
            raise PromptError(f"KeyMasks: a key slice is given twice in {slices}")
        masks = tuple(Mask2D(m, k).mask for m, k in zip(self.masks, slices))
        order = sorted(range(len(slices)), key=lambda i: slices[i])
        object.__setattr__(self, "masks", tuple(masks[i] for i in order))
        object.__setattr__(self, "slices", tuple(slices[i] for i in order))


def resolve_clicks(
    prompts: Sequence[Any], activate: Any, predictor: Any, S: int, H: int, W: int
) -> tuple[list[Box3D | Box2D | KeyBoxes], dict[int, tuple[int, np.ndarray]]]:
    """For the box-to-box walk: each :class:`Clicks2D` becomes the :class:`Box2D` of the mask its
    clicks give on its slice (``activate(slice)`` puts the slice into ``predictor``; an empty mask
    is refused), each :class:`Mask2D` that of its mask; returns the prompts and
    ``{object: (slice, mask)}`` for the key slices to keep."""
    out: list[Box3D | Box2D | KeyBoxes] = []
    clicked: dict[int, tuple[int, np.ndarray]] = {}
    for n, p in enumerate(prompts):
        if isinstance(p, Mask2D):
            p.check(S, H, W, f"object {n}")
            mask = p.mask
        elif isinstance(p, Clicks2D):
            p.check(S, H, W, f"object {n}")
            mask = _clicked_mask(p, activate, predictor, n, H, W)
        elif isinstance(p, KeyMasks):
            raise PromptError(f"object {n}: KeyMasks are tracked by SAM2-family models; give KeyBoxes here")
        else:
            out.append(p)
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        out.append(Box2D(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]), slice=p.slice))
        clicked[n] = (p.slice, mask)
    return out, clicked


def _clicked_mask(p: Clicks2D, activate: Any, predictor: Any, n: int, H: int, W: int) -> np.ndarray:
    """The mask the clicks (and box) of ``p`` give on its slice; an empty one is refused."""
    activate(p.slice)
    kwargs: dict[str, Any] = {
        "points": np.asarray([p.points], dtype=np.float64),
        "point_labels": np.asarray([p.labels]),
    }
    if p.box is not None:
        kwargs["boxes"] = np.asarray([prompt_box(*p.box, H, W)], dtype=np.float64)
    mask = np.asarray(predictor.predict(**kwargs, zoom=False).masks[0], dtype=bool)
    if not mask.any():
        raise PromptError(f"object {n}: the clicks on slice {p.slice} give an empty mask")
    return mask


def as_prompt(b: Any) -> Box3D | Box2D | KeyBoxes | Clicks2D | Mask2D | KeyMasks:
    if isinstance(b, (Box3D, Box2D, KeyBoxes, Clicks2D, Mask2D, KeyMasks)):
        return b
    arr = np.asarray(b, dtype=np.float64).reshape(-1)
    if arr.size == 6:
        return Box3D.from_array(arr)
    raise PromptError(
        "a volume prompt must be a Box3D, Box2D, KeyBoxes, Clicks2D, Mask2D, KeyMasks or "
        f"[x0, y0, z0, x1, y1, z1]; got {b!r}"
    )


@dataclass
class Track:
    """Propagation state of one walk: an object's, or for :class:`KeyBoxes` one of its key slices'."""

    index: int  # the object's
    key: int
    lo: int  # allowed slice range, inclusive
    hi: int
    key_box: np.ndarray  # (4,) prompt on the key slice
    limit: tuple[int, int, int, int]  # in-plane clip (x0, y0, x1, y1), inclusive
    end_reasons: tuple[str, str]  # (up, down) at the range's ends: "box_end", "volume_end" or "next_key"
    iou_stops: tuple[float, float]  # (up, down): a propagated slice with a predicted IoU below this ends the walk
    up: Step | None = None  # (box, (logits, zoom window or None) or None) going up; None = not walking
    down: Step | None = None
    kept: dict[int, KeptCrop] = field(default_factory=dict)  # slice -> (y0, x0, mask crop, score crop | None)
    scores: dict[int, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=lambda: ["", ""])
    resolved: int = 0  # slices of [lo, hi] decided (predicted or given up), for progress
    zoomed: bool = False  # segmented on a zoom crop on at least one slice


def check_inplane(x0: int, y0: int, x1: int, y1: int, H: int, W: int, what: str) -> None:
    if not (0 <= x0 <= x1 < W and 0 <= y0 <= y1 < H):
        raise PromptError(
            f"{what} [x0={x0}, y0={y0}, x1={x1}, y1={y1}] must satisfy 0 <= x0 <= x1 < {W} and "
            f"0 <= y0 <= y1 < {H} (inclusive indices in the slicing frame)"
        )


def prompt_box(x0: int, y0: int, x1: int, y1: int, H: int, W: int) -> np.ndarray:
    """Inclusive corners -> predictor box; a one-pixel-wide box gets a far corner one further."""
    return np.array([x0, y0, min(max(x1, x0 + 1), W), min(max(y1, y0 + 1), H)], dtype=np.float64)


# Default IoU stop of a walk with no other end than the object's (Box2D); a Box3D's walk has its
# z-range and by default no IoU stop.
BOX2D_IOU_THRESHOLD = 0.5


def make_tracks(
    prompts: Sequence[Box3D | Box2D | KeyBoxes],
    key_slices: Sequence[int | None] | None,
    S: int,
    H: int,
    W: int,
    margin: int,
    iou_threshold: float | None,
) -> list[Track]:
    if key_slices is not None and len(key_slices) != len(prompts):
        raise PromptError(f"key_slices has {len(key_slices)} entries for {len(prompts)} boxes")
    tracks: list[Track] = []
    for n, p in enumerate(prompts):
        override = None if key_slices is None else key_slices[n]
        if isinstance(p, Box3D):
            check_inplane(p.x0, p.y0, p.x1, p.y1, H, W, f"box {n}")
            if not 0 <= p.z0 <= p.z1 < S:
                raise PromptError(
                    f"box {n}: need 0 <= z0 <= z1 < {S} (slices along the slicing axis), got z0={p.z0}, z1={p.z1}"
                )
            key = (p.z0 + p.z1) // 2 if override is None else int(override)
            if not p.z0 <= key <= p.z1:
                raise PromptError(f"box {n}: key slice {key} lies outside its z-range {p.z0}..{p.z1}")
            limit = (
                max(p.x0 - margin, 0),
                max(p.y0 - margin, 0),
                min(p.x1 + margin, W - 1),
                min(p.y1 + margin, H - 1),
            )
            tracks.append(
                Track(
                    n,
                    key,
                    p.z0,
                    p.z1,
                    prompt_box(p.x0, p.y0, p.x1, p.y1, H, W),
                    limit,
                    ("box_end", "box_end"),
                    (-np.inf, -np.inf) if iou_threshold is None else (iou_threshold, iou_threshold),
                )
            )
        elif isinstance(p, KeyBoxes):
            if override is not None:
                raise PromptError(f"box {n}: KeyBoxes carries its key slices; key_slices[{n}] must be None")
            tracks.extend(_key_box_tracks(n, p, S, H, W, iou_threshold))
        else:
            check_inplane(p.x0, p.y0, p.x1, p.y1, H, W, f"box {n}")
            if not 0 <= p.slice < S:
                raise PromptError(f"box {n}: slice {p.slice} outside 0..{S - 1}")
            if override is not None and int(override) != p.slice:
                raise PromptError(f"box {n}: key_slices[{n}]={override} contradicts Box2D.slice={p.slice}")
            tracks.append(
                Track(
                    n,
                    p.slice,
                    0,
                    S - 1,
                    prompt_box(p.x0, p.y0, p.x1, p.y1, H, W),
                    (0, 0, W - 1, H - 1),
                    ("volume_end", "volume_end"),
                    (outer_stop(iou_threshold), outer_stop(iou_threshold)),
                )
            )
    return tracks


def outer_stop(iou_threshold: float | None) -> float:
    """The IoU stop of a walk whose only end is the object's own (a Box2D's, or beyond a
    KeyBoxes object's outermost keys)."""
    return BOX2D_IOU_THRESHOLD if iou_threshold is None else iou_threshold


def _key_box_tracks(n: int, p: KeyBoxes, S: int, H: int, W: int, iou_threshold: float | None) -> list[Track]:
    """One walk per key slice of a KeyBoxes object, over the slices nearest to that key."""
    order = sorted(range(len(p.slices)), key=lambda i: p.slices[i])
    keys = [int(p.slices[i]) for i in order]
    for k in keys:
        if not 0 <= k < S:
            raise PromptError(f"box {n}: key slice {k} outside 0..{S - 1}")
    tracks = []
    for j, i in enumerate(order):
        x0, y0, x1, y1 = (as_int(v) for v in p.boxes[i])
        check_inplane(x0, y0, x1, y1, H, W, f"box {n} on slice {keys[j]}")
        first, last = j == 0, j == len(keys) - 1
        lo = 0 if first else (keys[j - 1] + keys[j]) // 2 + 1
        hi = S - 1 if last else (keys[j] + keys[j + 1]) // 2
        tracks.append(
            Track(
                n,
                keys[j],
                lo,
                hi,
                prompt_box(x0, y0, x1, y1, H, W),
                (0, 0, W - 1, H - 1),
                ("volume_end" if last else "next_key", "volume_end" if first else "next_key"),
                (outer_stop(iou_threshold) if last else -np.inf, outer_stop(iou_threshold) if first else -np.inf),
            )
        )
    return tracks


def next_box(
    bbox: tuple[int, int, int, int], limit: tuple[int, int, int, int], margin: int, H: int, W: int
) -> np.ndarray:
    """Bounding box (x0, y0, x1, y1) of a mask, expanded by ``margin``, clipped to ``limit``."""
    x0, y0, x1, y1 = bbox
    lx0, ly0, lx1, ly1 = limit
    x0 = min(max(x0 - margin, lx0), lx1)
    y0 = min(max(y0 - margin, ly0), ly1)
    x1 = min(max(x1 + margin, lx0), lx1)
    y1 = min(max(y1 + margin, ly0), ly1)
    return prompt_box(x0, y0, x1, y1, H, W)
