"""Zoomed segmentation of small objects: segment a box on a magnified crop around it.

At 256 px (LiteMedSAM) a rib cross-section of a 512 x 512 CT slice is a few pixels wide, below
what a 64 x 64 embedding resolves. For a box much smaller than the image, segmenting a square crop
of ``context`` times the box's longest side, resized to the network input like any image, gives
the model the object at a useful size. Training draws the same crops (``data.augment.zoom_prob``),
so the model has seen magnified views (:func:`zoom_window` is shared by both).

Coordinates: boxes are inclusive ``[x0, y0, x1, y1]`` original pixels (x = column); a window is
``(y0, y1, x0, x1)`` with exclusive ends, inside the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .predictor import Predictor
    from .preprocess import Contract

# Largest network input side whose models zoom small 2D boxes by default (LiteMedSAM's 256 px:
# a 64 x 64 embedding of a whole slice does not resolve a rib); the inference recipe the embedded
# default was trained for (its stage 2 drew the same crops).
RECIPE_MAX_INPUT = 256


@dataclass(frozen=True)
class ZoomPolicy:
    """When and how a box is segmented on a crop.

    Attributes:
        context: crop side = ``context x`` the box's longest side (at least ``min_side``).
        min_side: smallest crop side, original pixels.
        max_crop_fraction: zoom only when the crop side is at most this fraction of the image's
            longest side (i.e. the crop is magnified at least ``1 / max_crop_fraction`` times
            more than the whole image would be).
    """

    context: float = 3.0
    min_side: int = 32
    max_crop_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.context < 1.0:
            raise ValueError(f"zoom context must be >= 1, got {self.context}")
        if self.min_side < 4:
            raise ValueError(f"zoom min_side must be >= 4, got {self.min_side}")
        if not 0.0 < self.max_crop_fraction <= 1.0:
            raise ValueError(f"zoom max_crop_fraction must lie in (0, 1], got {self.max_crop_fraction}")


def recipe_zoom(input_size: int) -> ZoomPolicy | None:
    """The default :class:`ZoomPolicy` of a model whose network input is ``input_size`` px: the
    standard policy for inputs of at most :data:`RECIPE_MAX_INPUT` px, else None (no zoom)."""
    return ZoomPolicy() if input_size <= RECIPE_MAX_INPUT else None


def resolve_zoom(choice: ZoomPolicy | bool | str | None, input_size: int) -> ZoomPolicy | None:
    """A zoom setting as the library takes it, resolved for a model of ``input_size`` px:
    ``"auto"`` the model's recipe (:func:`recipe_zoom`), ``True`` the default policy, ``False``
    or ``None`` no zoom, a :class:`ZoomPolicy` itself."""
    if isinstance(choice, ZoomPolicy):
        return choice
    if isinstance(choice, str):
        if choice != "auto":
            raise ValueError(f"zoom must be 'auto', True, False, None or a ZoomPolicy, got {choice!r}")
        return recipe_zoom(input_size)
    if choice is None or choice is False:
        return None
    if choice is True:
        return ZoomPolicy()
    raise TypeError(f"zoom must be 'auto', True, False, None or a ZoomPolicy, got {type(choice).__name__}")


def lowest_score(contract: Contract) -> float:
    """The per-pixel score outside a zoomed crop: 0 for probabilities (``medsam``/``lite``),
    minus infinity for logits (``sam``)."""
    return 0.0 if contract.name in ("medsam", "lite") else float("-inf")


def zoom_window(
    box: Sequence[float] | np.ndarray,
    size: tuple[int, int],
    context: float,
    min_side: int,
    offset: tuple[float, float] = (0.0, 0.0),
) -> tuple[int, int, int, int]:
    """Square window ``(y0, y1, x0, x1)`` of side ``max(context x longest box side, min_side)``.

    Centred on the box, moved by ``offset`` (dy, dx) pixels (training draws it; the caller keeps
    it within ``(side - box side) / 2`` so the box stays inside), then shifted to lie inside the
    (H, W) image. A window larger than the image along an axis is clipped to it. The box always
    lies inside the window.
    """
    H, W = size
    x0, y0, x1, y1 = (float(v) for v in box)
    side = int(round(max(context * (max(x1 - x0, y1 - y0) + 1.0), float(min_side))))
    out: list[int] = []
    for lo, hi, extent, off in ((y0, y1, H, offset[0]), (x0, x1, W, offset[1])):
        s = min(side, extent)
        start = int(round((lo + hi + 1.0) / 2.0 - s / 2.0 + off))
        start = min(max(start, 0), extent - s)
        # Rounding may cut the box's far edge by a pixel: keep it inside (a far corner one past
        # the last pixel, as a one-pixel-wide predictor box at the image edge has, counts as
        # the last pixel, so the window stays inside the image).
        start = min(start, int(lo))
        start = max(start, min(int(hi), extent - 1) + 1 - s)
        out.extend((start, start + s))
    return out[0], out[1], out[2], out[3]


def should_zoom(box: Sequence[float] | np.ndarray, size: tuple[int, int], policy: ZoomPolicy) -> bool:
    """True when the crop for ``box`` is small enough against the image to be worth a second embedding."""
    y0, y1, x0, x1 = zoom_window(box, size, policy.context, policy.min_side)
    return max(y1 - y0, x1 - x0) <= policy.max_crop_fraction * max(size)


@dataclass
class ZoomedPrediction:
    """Masks of N boxes, some segmented on a crop.

    Attributes:
        masks: (N, H, W) bool.
        scores: (N,) predicted IoU.
        zoomed: (N,) bool, True where the box was segmented on its crop.
        score_maps: (N, H, W) float32 per-pixel scores in the contract's units (probabilities
            for ``medsam``/``lite``, logits for ``sam``; the mask is ``score > threshold``), the
            lowest possible score outside a crop; only when asked for.
        threshold: the contract's mask threshold.
    """

    masks: np.ndarray
    scores: np.ndarray
    zoomed: np.ndarray
    score_maps: np.ndarray | None
    threshold: float

    def label_map(self) -> np.ndarray:
        """(H, W) labels 1..N, overlaps to the highest per-pixel score (as
        :func:`medsam.predictor.masks_to_label_map`); needs ``score_maps``."""
        if self.score_maps is None:
            raise ValueError("call predict_with_zoom(..., score_maps=True) for a label map")
        n = len(self.scores)
        labels = np.zeros(self.masks.shape[1:], dtype=np.uint16 if n > 255 else np.uint8)
        best = np.full(self.masks.shape[1:], -np.inf, dtype=np.float32)
        for i in range(n):
            score = self.score_maps[i]
            take = (score > self.threshold) & (score > best)
            labels[take] = i + 1
            best[take] = score[take]
        return labels


def predict_with_zoom(
    predictor: Predictor,
    image: np.ndarray,
    boxes: np.ndarray,
    policy: ZoomPolicy,
    crop_predictor: Predictor | None = None,
    score_maps: bool = False,
) -> ZoomedPrediction:
    """Segment ``boxes`` on ``image``, small boxes on a zoomed crop (``policy``).

    ``predictor`` holds ``image``'s embedding, or none yet: then ``image`` is embedded only when
    some box is too large to zoom (:meth:`Predictor.set_image` with ``defer``). The boxes go
    through :meth:`Predictor.predict` with ``zoom=policy``: the large ones in one batched call on
    the whole image, each small one on the embedding of its crop, made by ``crop_predictor`` (a
    second :class:`Predictor` on the same model; the predictor's own if not given), its mask
    pasted back (zero outside the crop).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not predictor.is_image_set:
        predictor.set_image(image, defer=True)
    elif not predictor.has_pixels:
        predictor.attach_pixels(image)
    if crop_predictor is not None:
        predictor.crop_predictor = crop_predictor
    prediction = predictor.predict(boxes=boxes, zoom=policy)
    maps = None
    if score_maps:
        H, W = image.shape[:2]
        maps = np.empty((len(boxes), H, W), dtype=np.float32)
        for i in range(len(boxes)):
            maps[i] = prediction.score_maps(i)[0]
    threshold = float(predictor.contract.threshold)
    return ZoomedPrediction(prediction.masks, prediction.scores, prediction.zoomed, maps, threshold)
