"""Scribble prompts: strokes drawn over an object (or over background) turned into point prompts.

SAM's prompt encoder takes points, boxes and low-resolution mask logits; it has no scribble input,
and the MedSAM / LiteMedSAM decoders were trained on boxes (ours also on clicks). A stroke is
therefore given to the model as the clicks a person would have made along it: points at equal
arc-length steps, end points included, as many as steps of at least ``spacing`` pixels fit but at
most ``max_points`` per stroke (a stroke shorter than ``spacing`` becomes one point at its
middle). A positive stroke (drawn
inside the object) gives positive points, a negative one (over background the mask wrongly
covers) negative points. With the shipped default model strokes help less than clicks over many
corrections (it was trained with up to 3 clicks, not with point sets along strokes); the
measurements, with other spacings and point counts, are in docs/workbench.md
(``benchmarks/simulated_annotator.py --scribbles``). Training can place error strokes
(``data.click_source: scribbles``).

:func:`next_scribble` is the simulated annotator's corrective stroke: along the medial axis of
the error region that :func:`medsam.clicks.next_click` would click in.

Coordinates: (x, y) pixel positions of the image the prompt is for, x = column, y = row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .error_regions import deepest_error
from .errors import PromptError

# Arc length between two sampled points, in image pixels, and the most points one stroke gives.
DEFAULT_SPACING = 12.0
DEFAULT_MAX_POINTS = 4


@dataclass(frozen=True)
class Scribble:
    """One stroke: ``vertices`` (K, 2) (x, y) image pixels in drawing order, K >= 1;
    ``positive`` = drawn inside the object (False: over background to remove)."""

    vertices: np.ndarray
    positive: bool = True

    def __post_init__(self) -> None:
        v = np.asarray(self.vertices, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != 2 or len(v) == 0:
            raise PromptError(f"a scribble needs (K, 2) vertices (x, y) with K >= 1, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise PromptError("a scribble's vertices contain NaN or infinite values")
        object.__setattr__(self, "vertices", v)


def sample_stroke(
    vertices: np.ndarray, spacing: float = DEFAULT_SPACING, max_points: int = DEFAULT_MAX_POINTS
) -> np.ndarray:
    """Points along a polyline (K, 2) at equal arc-length steps: (P, 2), P = min(max_points,
    1 + floor(length / spacing)), both ends included when P >= 2, the arc-length middle when
    P = 1 (a dot or a stroke shorter than ``spacing``)."""
    if spacing <= 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    v = np.asarray(vertices, dtype=np.float64)
    step = np.linalg.norm(np.diff(v, axis=0), axis=1)
    keep = np.concatenate([[True], step > 0])  # drop repeated vertices: arc length must increase
    v, step = v[keep], step[step > 0]
    arc = np.concatenate([[0.0], np.cumsum(step)])
    length = arc[-1]
    count = int(min(max_points, 1 + np.floor(length / spacing)))
    if count == 1:
        at = np.array([length / 2])
    else:
        at = np.linspace(0.0, length, count)
    return np.stack([np.interp(at, arc, v[:, 0]), np.interp(at, arc, v[:, 1])], axis=1)


def scribbles_to_points(
    scribbles: Sequence[Scribble],
    spacing: float = DEFAULT_SPACING,
    max_points: int = DEFAULT_MAX_POINTS,
) -> tuple[np.ndarray, np.ndarray]:
    """The point prompt of one object's strokes: coords (P, 2) (x, y) and labels (P,) (1 positive,
    0 negative), the strokes' points in the order given."""
    coords, labels = [], []
    for s in scribbles:
        if not isinstance(s, Scribble):
            raise PromptError(f"expected a Scribble, got {type(s).__name__}")
        pts = sample_stroke(s.vertices, spacing, max_points)
        coords.append(pts)
        labels.append(np.full(len(pts), 1 if s.positive else 0, dtype=np.int64))
    if not coords:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    return np.concatenate(coords), np.concatenate(labels)


def merge_point_prompts(
    prompts: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-object point prompts of different lengths as one (N, P, 2) array and (N, P) labels,
    the shorter ones padded with label -1 (SAM's "not a point"; its coordinates are ignored)."""
    width = max((len(c) for c, _ in prompts), default=0)
    coords = np.zeros((len(prompts), width, 2))
    labels = np.full((len(prompts), width), -1, dtype=np.int64)
    for i, (c, lab) in enumerate(prompts):
        coords[i, : len(c)] = c
        labels[i, : len(c)] = lab
    return coords, labels


def next_scribble(pred: np.ndarray, gt: np.ndarray) -> Scribble | None:
    """A simulated corrective stroke for an (H, W) bool prediction against the (H, W) bool truth.

    The error region is the one :func:`medsam.clicks.next_click` clicks in (the missed or false
    region holding the pixel deepest inside either, by the Euclidean distance transform); the
    stroke follows a long path of that connected component's skeleton (its medial axis), found by
    two breadth-first searches from the deepest pixel's nearest skeleton pixel (the longest path
    when the skeleton has no loops; a ring-shaped region gives a long path around it). Compact
    blobs (a disk, a square) skeletonise to a few pixels, so their stroke is nearly a click.
    Positive in a missed region, negative in a false one; None when the prediction is perfect.
    """
    from skimage.morphology import skeletonize

    error = deepest_error(pred, gt)
    if error is None:
        return None
    region, deepest, positive = error
    components, _ = ndimage.label(region, structure=np.ones((3, 3)))
    component = components == components[deepest]
    skeleton = skeletonize(component)  # topology-preserving: never empty for a component
    ys, xs = np.nonzero(skeleton)
    nearest = int(np.argmin((ys - deepest[0]) ** 2 + (xs - deepest[1]) ** 2))
    start = (int(ys[nearest]), int(xs[nearest]))
    far, _ = _farthest(skeleton, start)
    end, parents = _farthest(skeleton, far)
    path = [end]
    while path[-1] != far:
        path.append(parents[path[-1]])
    vertices = np.array([[px, py] for py, px in path], dtype=np.float64)
    return Scribble(vertices, positive)


def _farthest(skeleton: np.ndarray, start: tuple[int, int]) -> tuple[tuple[int, int], dict]:
    """The skeleton pixel farthest (in 8-connected steps) from ``start``, and the BFS parents."""
    H, W = skeleton.shape
    parents = {start: start}
    queue = deque([start])
    last = start
    while queue:
        last = queue.popleft()
        y, x = last
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < H and 0 <= nx < W and skeleton[ny, nx] and (ny, nx) not in parents:
                    parents[(ny, nx)] = last
                    queue.append((ny, nx))
    return last, parents


def add_scribble_points(
    points: np.ndarray | list | None,
    point_labels: np.ndarray | list | None,
    scribbles: Scribble | Sequence,
    size: tuple[int, int],
    spacing: float = DEFAULT_SPACING,
    max_points: int = DEFAULT_MAX_POINTS,
) -> tuple[np.ndarray | list | None, np.ndarray | list | None]:
    """Point prompts (N, P, 2) and labels (N, P) with each object's strokes appended.

    ``scribbles``: one Scribble, a list of Scribbles (one object) or N lists (N objects; one
    object's points are shared by all N). ``points`` (N, P, 2) or (P, 2) and ``point_labels`` as
    :meth:`medsam.predictor.Predictor.predict` takes them, or None. Objects with fewer points are
    padded with label -1. Vertices must lie inside the (H, W) image (``size``). With no stroke at
    all (``[]``, ``[[]]``) ``points`` and ``point_labels`` come back unchanged.
    """
    if isinstance(scribbles, Scribble):
        per_object = [[scribbles]]
    else:
        items = list(scribbles)
        if all(isinstance(s, Scribble) for s in items):
            per_object = [items]
        elif all(isinstance(s, (list, tuple)) for s in items):
            per_object = [list(s) for s in items]
        else:
            raise PromptError("scribbles must be a Scribble, a list of them (one object) or one list per object")
    if not any(per_object):
        return points, point_labels
    H, W = size
    for strokes in per_object:
        for s in strokes:
            if not isinstance(s, Scribble):
                raise PromptError(f"expected a Scribble, got {type(s).__name__}")
            v = s.vertices
            if (v[:, 0] < 0).any() or (v[:, 0] > W).any() or (v[:, 1] < 0).any() or (v[:, 1] > H).any():
                raise PromptError(f"a scribble vertex lies outside the {W}x{H} image")
    given: list[tuple[np.ndarray, np.ndarray]] = []
    if points is not None:
        if point_labels is None:
            raise PromptError("point_labels are required with points (1 = foreground, 0 = background)")
        p = np.asarray(points, dtype=np.float64)
        lab = np.asarray(point_labels)
        if p.ndim == 2:
            p, lab = p[None], lab[None] if lab.ndim == 1 else lab
        if p.ndim != 3 or p.shape[2] != 2 or lab.shape != p.shape[:2]:
            raise PromptError(f"points must be (N, P, 2) with labels (N, P); got {p.shape} and {lab.shape}")
        given = [(p[i], lab[i]) for i in range(len(p))]
    n = max(len(given), len(per_object))
    if len(given) not in (0, 1, n) or len(per_object) not in (1, n):
        raise PromptError(f"prompt counts do not match: {len(given)} point sets, {len(per_object)} scribble sets")
    merged = []
    for i in range(n):
        strokes = per_object[i if len(per_object) == n else 0]
        c, lab = scribbles_to_points(strokes, spacing, max_points)
        if given:
            gc, gl = given[i if len(given) == n else 0]
            real = gl != -1
            c, lab = np.concatenate([gc[real], c]), np.concatenate([gl[real], lab])
        merged.append((c, lab))
    return merge_point_prompts(merged)
