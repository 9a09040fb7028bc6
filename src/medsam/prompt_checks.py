"""Checks of 2D prompts (boxes, points, mask prompts) before they reach a model.

Coordinates are pixels of the input image, x to the right and y down; box corners are inclusive
pixel positions, a corner may also sit on the far edge (x = W, y = H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PromptError


@dataclass(frozen=True)
class CheckedPrompts:
    """Prompts of N objects after :meth:`Predictor.predict`'s checks, in input pixels, each kind
    expanded to N (None where not given): boxes (N, 4), points (N, P, 2) with labels (N, P),
    mask_input (N, 1, L, L)."""

    n: int
    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    mask_input: np.ndarray | None

    def select(self, index: np.ndarray) -> CheckedPrompts:
        """The prompts of the objects ``index``."""

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return CheckedPrompts(len(index), take(self.boxes), take(self.points), take(self.labels), take(self.mask_input))

    def shifted(self, x0: float, y0: float) -> CheckedPrompts:
        """The prompts with the origin moved to (x0, y0) (a crop's corner); padding points stay."""
        boxes = None if self.boxes is None else self.boxes - np.array([x0, y0, x0, y0], dtype=np.float64)
        points = None
        if self.points is not None and self.labels is not None:
            points = np.where((self.labels == -1)[..., None], self.points, self.points - np.array([x0, y0]))
        return CheckedPrompts(self.n, boxes, points, self.labels, self.mask_input)


def check_prompts(
    boxes: np.ndarray | list[Any] | None,
    points: np.ndarray | list[Any] | None,
    point_labels: np.ndarray | list[Any] | None,
    mask_input: np.ndarray | None,
    size: tuple[int, int],
    mask_input_size: int,
) -> CheckedPrompts:
    """Check the prompts of :meth:`medsam.Predictor.predict` for an (H, W) image and a model
    whose mask prompts are ``mask_input_size`` square; raise :class:`PromptError`. Returns them
    in input pixels, each kind expanded to the N objects."""
    H, W = size
    counts: list[int] = []
    b = p = lab = m = None
    if boxes is not None:
        b = np.asarray(boxes, dtype=np.float64)
        if b.ndim == 1:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0:
            raise PromptError(f"boxes must have shape (N, 4), got {np.asarray(boxes).shape}")
        validate_boxes(b, (H, W))
        counts.append(len(b))
    if points is not None:
        p = np.asarray(points, dtype=np.float64)
        if p.ndim == 2:
            p = p[None]
        if point_labels is None:
            raise PromptError("point_labels are required with points (1 = foreground, 0 = background)")
        lab = np.asarray(point_labels)
        if lab.ndim == 1:
            lab = lab[None]
        if p.ndim != 3 or p.shape[2] != 2 or lab.shape != p.shape[:2]:
            raise PromptError(f"points must be (N, P, 2) with labels (N, P); got {p.shape} and {lab.shape}")
        if not np.isfinite(p).all():
            raise PromptError("points contain NaN or infinite values")
        if (p[..., 0] < 0).any() or (p[..., 0] > W).any() or (p[..., 1] < 0).any() or (p[..., 1] > H).any():
            raise PromptError(f"a point lies outside the {W}x{H} image")
        if not np.isin(lab, (-1, 0, 1)).all():
            raise PromptError("point labels must be 1 (foreground), 0 (background) or -1 (padding)")
        if boxes is None and mask_input is None and (lab == -1).all(axis=1).any():
            raise PromptError("a prompt has only padding points (label -1) and no box or mask")
        counts.append(len(p))
    if mask_input is not None:
        m = np.asarray(mask_input, dtype=np.float32)
        L = mask_input_size
        if m.ndim == 2:  # (L, L): one prompt
            m = m[None, None]
        elif m.ndim == 3:  # (N, L, L)
            m = m[:, None]
        if m.ndim != 4 or m.shape[1:] != (1, L, L):
            raise PromptError(f"mask_input must be (N, 1, {L}, {L}) logits, got {np.asarray(mask_input).shape}")
        if not np.isfinite(m).all():
            raise PromptError("mask_input contains NaN or infinite values")
        counts.append(len(m))
    if not counts:
        raise PromptError("give at least one prompt: boxes, points or mask_input")
    n = max(counts)
    if any(c not in (1, n) for c in counts):
        raise PromptError(f"prompt counts do not match: {counts}")
    return CheckedPrompts(
        n,
        None if b is None else np.broadcast_to(b, (n, 4)),
        None if p is None else np.broadcast_to(p, (n, *p.shape[1:])),
        None if lab is None else np.broadcast_to(lab, (n, *lab.shape[1:])),
        None if m is None else np.broadcast_to(m, (n, *m.shape[1:])),
    )


def multimask_mode(multimask: object) -> bool:
    """Whether ``multimask`` asks for all four masks ("all"); other strings are refused, any
    other value counts by its truth (True, np.True_, 1: the three alternatives)."""
    if isinstance(multimask, str):
        if multimask != "all":
            raise ValueError(f"multimask must be True, False or 'all', got {multimask!r}")
        return True
    return False


def validate_boxes(boxes: np.ndarray, size: tuple[int, int]) -> None:
    """Check (N, 4) boxes [x0, y0, x1, y1] against an image of (H, W); raise PromptError.

    Corners are inclusive pixel positions; a corner may also sit on the far edge (x = W, y = H)
    for users who give exclusive ends.
    """
    H, W = size
    if not np.isfinite(boxes).all():
        raise PromptError("boxes contain NaN or infinite values")
    for x0, y0, x1, y1 in boxes:
        if x1 <= x0 or y1 <= y0:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty: need x1 > x0 and y1 > y0")
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            raise PromptError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the image (width {W}, height {H})")


def clip_boxes(boxes: np.ndarray, size: tuple[int, int], inclusive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Clip (N, 4) boxes [x0, y0, x1, y1] to an (H, W) image, as a drawn box that crosses the
    image edge is meant: returns ``(clipped boxes, (N,) bool: which ones changed)``.

    Corners are clipped to ``[0, W]`` x ``[0, H]`` (the far edge allowed, as in
    :func:`validate_boxes`), or with ``inclusive`` to the pixel indices ``[0, W - 1]`` x
    ``[0, H - 1]`` (a volume's boxes, :mod:`medsam.volume`, where ``x1 == x0`` is one pixel).
    Raises :class:`PromptError` for NaN or infinite values and for a box that is empty, or lies
    wholly outside the image.
    """
    H, W = size
    far_x, far_y = (W - 1, H - 1) if inclusive else (W, H)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(b).all():
        raise PromptError("boxes contain NaN or infinite values")
    clipped = b.copy()
    clipped[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, far_x)
    clipped[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, far_y)
    for original, (x0, y0, x1, y1) in zip(b, clipped):
        ox0, oy0, ox1, oy1 = original
        outside = ox0 > far_x or oy0 > far_y or ox1 < 0 or oy1 < 0
        empty = (x1 < x0 or y1 < y0) if inclusive else (x1 <= x0 or y1 <= y0)
        if outside or empty:
            where = "lies outside the image" if (ox1 > ox0 and oy1 > oy0) else "is empty"
            need = "x1 >= x0 and y1 >= y0" if inclusive else "x1 > x0 and y1 > y0"
            raise PromptError(
                f"box [{', '.join(f'{v:g}' for v in original)}] {where} (width {W}, height {H}): need {need} inside it"
            )
    return clipped, (clipped != b).any(axis=1)
