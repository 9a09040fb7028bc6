"""Automatic mode: every object of an image without a prompt from the user.

Two ways to ask the promptable model, chosen by what it was trained on:

* ``"points"`` (SAM-contract models; SAM's "everything" mode, the algorithm of
  ``segment-anything==1.0``'s ``SamAutomaticMaskGenerator`` with the same options and defaults):
  a regular grid of single foreground clicks, three candidate masks per click; candidates are kept
  when the predicted IoU exceeds ``pred_iou_thresh`` and the *stability score* (the IoU of the
  mask thresholded at ``threshold + offset`` and at ``threshold - offset``, in logit units)
  reaches ``stability_score_thresh``; masks touching a crop's edge (but not the image's) are
  dropped; duplicates are removed by box non-maximum suppression ranked by predicted IoU; with
  ``crop_n_layers > 0`` the image is also cut into overlapping crops (layer i has 2^i x 2^i of
  them, each with a grid ``crop_n_points_downscale_factor^i`` times sparser) and duplicates
  between crops are removed preferring the smaller crop; ``min_mask_region_area > 0`` fills
  holes and removes islands smaller than that (8-connected), then suppresses duplicates again
  preferring the masks that needed no clean-up.
* ``"boxes"`` (MedSAM and LiteMedSAM, which were trained on boxes and ignore a lone click): one
  box around each region of Felzenszwalb's graph segmentation at several scales
  (``region_scales``, regions of ``region_area`` of the image; :func:`region_boxes`), or with
  ``box_source="grid"`` a grid of square boxes at several sizes (``box_sizes``, fractions of the
  image's shorter side); one mask per box. Besides the predicted IoU and stability filters, a
  candidate is kept only when its mask agrees with the box that asked for it (the IoU of the
  mask's bounding box with the prompt box reaches ``box_agreement_thresh``): a box drawn around
  an object returns that object, a box over a part of one returns a mask spilling out of it or
  a fragment. Then the same suppression and clean-up.

Where a label map of the image already exists (a specialist network's prediction, a threshold, an
atlas), :func:`refine_proposals` asks the model with the box of each of its connected pieces
instead: the proposal says *where* an object is, the promptable model draws its outline.

The result is a list of :class:`AutoMask` (highest-ranked first) and
:func:`instance_label_map` turns it into one label map.

Conventions: images are (H, W) or (H, W, 3) in pixel units; ``bbox`` and ``crop_box`` are
SAM's ``[x, y, w, h]`` with ``x + w`` the column of the last mask pixel (SAM's inclusive box);
point and box prompts are (x, y) pixel coordinates of the image.

Grids, crops, region boxes, box suppression and the small-region clean-up are in
:mod:`medsam.automatic_geometry` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from .automatic_geometry import box_grid as box_grid
from .automatic_geometry import box_nms as box_nms
from .automatic_geometry import crop_boxes as crop_boxes
from .automatic_geometry import mask_box as mask_box
from .automatic_geometry import point_grid as point_grid
from .automatic_geometry import region_boxes as region_boxes
from .automatic_geometry import remove_small_regions as remove_small_regions
from .automatic_geometry import xywh, xyxy
from .predictor import Predictor

__all__ = [
    "AutoMask",
    "AutoOptions",
    "box_nms",
    "crop_boxes",
    "generate_masks",
    "instance_label_map",
    "point_grid",
    "refine_proposals",
    "remove_small_regions",
]

PromptKind = Literal["points", "boxes"]


@dataclass(frozen=True)
class AutoOptions:
    """Options of automatic mode; the names and defaults of SAM's generator where they exist.

    ``prompt``: ``"points"``, ``"boxes"`` or ``None`` (the model's kind: points for the ``sam``,
    ``sam2`` and ``medsam2`` contracts, boxes for ``medsam`` and ``lite``).

    ``pred_iou_thresh``, ``stability_score_thresh`` and ``box_nms_thresh`` left at ``None`` take
    the defaults of the prompt kind (:data:`DEFAULT_THRESHOLDS`): SAM's 0.88 / 0.95 / 0.7 for
    points; 0.7 / 0.8 / 0.5 for boxes (chosen on the bundled CT and MR samples,
    ``benchmarks/automatic_mode.py``).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    stability_score_offset: float = 1.0
    box_nms_thresh: float | None = None
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    prompt: PromptKind | None = None
    box_source: Literal["regions", "grid"] = "regions"
    region_scales: tuple[float, ...] = (100.0, 300.0, 1000.0)
    region_area: tuple[float, float] = (0.0005, 0.25)
    box_sizes: tuple[float, ...] = (0.08, 0.16, 0.32)
    box_agreement_thresh: float = 0.7

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_n_layers < 0 or self.min_mask_region_area < 0:
            raise ValueError("crop_n_layers and min_mask_region_area must be >= 0")
        if self.points_per_side // self.crop_n_points_downscale_factor**self.crop_n_layers < 1:
            raise ValueError("points_per_side / crop_n_points_downscale_factor ** crop_n_layers leaves no point")
        for name in ("box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio", "box_agreement_thresh"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        for name in ("pred_iou_thresh", "stability_score_thresh"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not math.isfinite(self.stability_score_offset) or self.stability_score_offset < 0:
            raise ValueError(f"stability_score_offset must be >= 0, got {self.stability_score_offset}")
        if self.prompt not in (None, "points", "boxes"):
            raise ValueError(f"prompt must be 'points', 'boxes' or None, got {self.prompt!r}")
        if self.box_source not in ("regions", "grid"):
            raise ValueError(f"box_source must be 'regions' or 'grid', got {self.box_source!r}")
        if not self.region_scales or any(not (math.isfinite(s) and s > 0) for s in self.region_scales):
            raise ValueError(f"region_scales must be positive, got {self.region_scales}")
        low, high = self.region_area
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"region_area must be (low, high) fractions with low < high, got {self.region_area}")
        if not self.box_sizes or any(not 0.0 < s <= 1.0 for s in self.box_sizes):
            raise ValueError(f"box_sizes must be fractions in (0, 1], got {self.box_sizes}")

    def resolved(self, kind: PromptKind) -> AutoOptions:
        """These options with every ``None`` threshold replaced by ``kind``'s default."""
        defaults = DEFAULT_THRESHOLDS[kind]

        def pick(name: str) -> float:
            value = getattr(self, name)
            return defaults[name] if value is None else float(value)

        return replace(
            self,
            prompt=kind,
            pred_iou_thresh=pick("pred_iou_thresh"),
            stability_score_thresh=pick("stability_score_thresh"),
            box_nms_thresh=pick("box_nms_thresh"),
        )


# prompt kind -> the thresholds AutoOptions leaves at None
DEFAULT_THRESHOLDS: dict[str, dict[str, float]] = {
    "points": {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "box_nms_thresh": 0.7},
    "boxes": {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.8, "box_nms_thresh": 0.5},
}


@dataclass
class AutoMask:
    """One object found by automatic mode.

    ``segmentation``: (H, W) bool; ``area``: its pixel count; ``bbox``: SAM's inclusive
    ``[x, y, w, h]``; ``predicted_iou`` and ``stability_score``: the quality measures it was
    kept for; ``prompt``: the click ``[x, y]`` or box ``[x0, y0, x1, y1]`` that produced it;
    ``crop_box``: ``[x, y, w, h]`` of the crop it was found in.
    """

    segmentation: np.ndarray
    area: int
    bbox: list[int]
    predicted_iou: float
    stability_score: float
    prompt: list[float]
    crop_box: list[int]
    box_agreement: float | None = None
    proposal_label: int | None = None

    def record(self) -> dict[str, object]:
        """The JSON-friendly fields (everything but the mask)."""
        out: dict[str, object] = {
            "area": self.area,
            "bbox": self.bbox,
            "predicted_iou": self.predicted_iou,
            # an empty mask's stability is 0 / 0: null, not JSON's missing NaN
            "stability_score": None if math.isnan(self.stability_score) else self.stability_score,
            "prompt": self.prompt,
            "crop_box": self.crop_box,
        }
        if self.box_agreement is not None:
            out["box_agreement"] = self.box_agreement
        if self.proposal_label is not None:
            out["proposal_label"] = self.proposal_label
        return out


def instance_label_map(masks: Sequence[AutoMask], size: tuple[int, int]) -> np.ndarray:
    """(H, W) labels 1..N for ``masks[0..N-1]`` (0 = none). Where masks overlap, the smaller
    mask wins (a part shows inside its whole); uint8, or uint16 above 255 objects."""
    labels = np.zeros(size, dtype=np.uint8 if len(masks) <= 255 else np.uint16)
    for index in sorted(range(len(masks)), key=lambda i: -masks[i].area):
        labels[masks[index].segmentation] = index + 1
    return labels


# ----------------------------------------------------------------------------- the generator
@dataclass
class _Candidates:
    """Kept candidates of one crop, masks stored cut to their box (in crop pixels)."""

    boxes: list[list[int]] = field(default_factory=list)  # inclusive, crop frame
    pieces: list[np.ndarray] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    prompts: list[list[float]] = field(default_factory=list)
    agreement: list[float | None] = field(default_factory=list)


@dataclass
class _Steps:
    """Progress of one generate_masks call: an embedding per crop, then its batches of prompts."""

    total: int
    report: Callable[[int, int], None] | None
    done: int = 0

    def expect(self, more: int) -> None:
        self.total += more

    def advance(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _prompt_kind(predictor: Predictor, options: AutoOptions) -> PromptKind:
    if options.prompt is not None:
        return options.prompt
    return "boxes" if predictor.contract.name in ("medsam", "lite") else "points"


def _stability_thresholds(predictor: Predictor, offset: float) -> tuple[float, float]:
    """(low, high) thresholds on the contract's mask scores that are ``threshold -+ offset``
    in logit units (through the sigmoid for contracts whose scores are probabilities)."""
    contract = predictor.contract
    if contract.threshold == 0.0:
        return -offset, offset
    return 1.0 / (1.0 + math.exp(offset)), 1.0 / (1.0 + math.exp(-offset))


def _process_crop(
    predictor: Predictor,
    image: np.ndarray,
    crop: list[int],
    layer: int,
    size: tuple[int, int],
    kind: PromptKind,
    options: AutoOptions,
    steps: _Steps,
) -> _Candidates:
    x0, y0, x1, y1 = crop
    predictor.set_image(image[y0:y1, x0:x1])
    steps.advance()
    geom = predictor.geometry
    crop_h, crop_w = geom.original_size
    threshold = predictor.contract.threshold
    low, high = _stability_thresholds(predictor, options.stability_score_offset)
    iou_thresh, stability_thresh = _given(options.pred_iou_thresh), _given(options.stability_score_thresh)
    if kind == "points":
        n_side = int(options.points_per_side / options.crop_n_points_downscale_factor**layer)
        prompts = point_grid(n_side) * np.array([crop_w, crop_h], dtype=np.float64)
    elif options.box_source == "grid":
        prompts = box_grid((crop_h, crop_w), options.points_per_side, options.box_sizes)
    else:
        prompts = region_boxes(image[y0:y1, x0:x1], options.region_scales, options.region_area)
    if len(prompts) == 0:
        predictor.reset_image()
        return _Candidates()
    height, width = size
    out = _Candidates()
    steps.expect(-(-len(prompts) // options.points_per_batch))
    for part in _batches(len(prompts), options.points_per_batch):
        batch = prompts[part]
        if kind == "points":
            decoded = predictor.decode(points=batch[:, None, :], point_labels=np.ones((len(batch), 1)), multimask=True)
        else:
            decoded = predictor.decode(boxes=batch)
        steps.advance()
        logits = decoded.logits.float()
        ious = decoded.iou.float()
        per_prompt = logits.shape[1]
        logits, ious = logits.flatten(0, 1), ious.flatten(0, 1)
        source = np.repeat(np.arange(len(batch)), per_prompt)
        if iou_thresh > 0:
            kept = torch.nonzero(ious > iou_thresh).flatten().cpu()
        else:
            kept = torch.arange(len(ious))
        # Upsample only the candidates that passed, a few at a time (memory stays bounded).
        chunk = max(1, int(64e6 // (4 * crop_h * crop_w)))
        for start in range(0, len(kept), chunk):
            index = kept[start : start + chunk]
            scores = predictor.contract.mask_scores(logits[index.to(logits.device)][:, None], geom)[:, 0]
            stable = (scores > high).flatten(1).sum(1, dtype=torch.int64).cpu().numpy()
            union = (scores > low).flatten(1).sum(1, dtype=torch.int64).cpu().numpy()
            masks = (scores > threshold).cpu().numpy()
            for j, candidate in enumerate(index.tolist()):
                # float32 ratio and comparison, as the reference computes them
                with np.errstate(invalid="ignore", divide="ignore"):
                    stability = np.float32(stable[j]) / np.float32(union[j])
                if stability_thresh > 0 and not stability >= np.float32(stability_thresh):
                    continue
                mask = masks[j]
                box = mask_box(mask)
                if _near_crop_edge(box, crop, (width, height)):
                    continue
                agreement = None
                if kind == "boxes":
                    asked = batch[source[candidate]]
                    agreement = _box_iou([box[0], box[1], box[2] + 1, box[3] + 1], asked) if mask.any() else 0.0
                    if agreement < options.box_agreement_thresh:
                        continue
                out.boxes.append(box)
                out.pieces.append(mask[box[1] : box[3] + 1, box[0] : box[2] + 1].copy())
                out.ious.append(float(ious[candidate]))
                out.stability.append(float(stability))
                out.prompts.append([float(v) for v in batch[source[candidate]]])
                out.agreement.append(agreement)
    predictor.reset_image()
    return out


def _near_crop_edge(box: list[int], crop: list[int], image_size: tuple[int, int], atol: float = 20.0) -> bool:
    """Whether the (crop-frame) inclusive box touches the crop's edge where that is not the image's edge."""
    width, height = image_size
    shifted = [box[0] + crop[0], box[1] + crop[1], box[2] + crop[0], box[3] + crop[1]]
    image_box = [0, 0, width, height]
    return any(abs(v - c) <= atol and not abs(v - e) <= atol for v, c, e in zip(shifted, crop, image_box, strict=True))


def generate_masks(
    predictor: Predictor,
    image: np.ndarray,
    options: AutoOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[AutoMask]:
    """Every object of ``image`` ((H, W) or (H, W, 3), any dtype :meth:`Predictor.set_image`
    takes) as a list of :class:`AutoMask`, best first. The predictor's current image is replaced.

    ``progress(done, total)`` is called after each crop's embedding and each batch of prompts
    (``total`` grows as crops reveal their prompts); an exception raised there stops the work.
    """
    options = options or AutoOptions()
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"automatic mode takes one 2D image (H, W) or (H, W, 3), got shape {image.shape}")
    size = (int(image.shape[0]), int(image.shape[1]))
    kind = _prompt_kind(predictor, options)
    options = options.resolved(kind)
    nms_thresh = _given(options.box_nms_thresh)
    found: list[tuple[list[int], _Candidates]] = []
    crops = crop_boxes(size, options.crop_n_layers, options.crop_overlap_ratio)
    steps = _Steps(len(crops), progress)
    for crop, layer in crops:
        candidates = _process_crop(predictor, image, crop, layer, size, kind, options, steps)
        keep = box_nms(np.asarray(candidates.boxes, dtype=np.float64), np.asarray(candidates.ious), nms_thresh)
        found.append((crop, _subset(candidates, keep)))

    masks: list[AutoMask] = []
    crop_of: list[list[int]] = []
    for crop, candidates in found:
        for i in range(len(candidates.boxes)):
            masks.append(_full_mask(candidates, i, crop, size))
            crop_of.append(crop)
    if len(found) > 1 and masks:
        # between crops, prefer the mask from the smaller crop
        areas = np.array([(c[2] - c[0]) * (c[3] - c[1]) for c in crop_of], dtype=np.float64)
        boxes = np.array([xyxy(m.bbox) for m in masks], dtype=np.float64)
        masks = [masks[i] for i in box_nms(boxes, 1.0 / areas, options.crop_nms_thresh)]
    if options.min_mask_region_area > 0 and masks:
        masks = _clean_small_regions(masks, options.min_mask_region_area, max(nms_thresh, options.crop_nms_thresh))
    return masks


def _given(value: float | None) -> float:
    if value is None:
        raise AssertionError("AutoOptions.resolved() fills every threshold")
    return float(value)


def _subset(candidates: _Candidates, keep: np.ndarray) -> _Candidates:
    picked = [int(i) for i in keep]
    return _Candidates(*([getattr(candidates, f)[i] for i in picked] for f in _Candidates.__dataclass_fields__))


def _full_mask(candidates: _Candidates, i: int, crop: list[int], size: tuple[int, int]) -> AutoMask:
    x0, y0 = crop[0], crop[1]
    box = candidates.boxes[i]
    full = np.zeros(size, dtype=bool)
    piece = candidates.pieces[i]
    full[box[1] + y0 : box[1] + y0 + piece.shape[0], box[0] + x0 : box[0] + x0 + piece.shape[1]] = piece
    image_box = [box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0]
    prompt = list(candidates.prompts[i])
    offsets = [x0, y0] * (len(prompt) // 2)
    return AutoMask(
        segmentation=full,
        area=int(piece.sum()),
        bbox=xywh(image_box),
        predicted_iou=candidates.ious[i],
        stability_score=candidates.stability[i],
        prompt=[p + o for p, o in zip(prompt, offsets, strict=True)],
        crop_box=xywh(crop),
        box_agreement=candidates.agreement[i],
    )


def _clean_small_regions(masks: list[AutoMask], min_area: int, nms_thresh: float) -> list[AutoMask]:
    """Fill small holes, drop small islands, then suppress duplicates preferring untouched masks."""
    cleaned: list[AutoMask] = []
    untouched: list[float] = []
    for m in masks:
        mask, changed_holes = remove_small_regions(m.segmentation, min_area, "holes")
        mask, changed_islands = remove_small_regions(mask, min_area, "islands")
        changed = changed_holes or changed_islands
        untouched.append(0.0 if changed else 1.0)
        cleaned.append(replace(m, segmentation=mask, area=int(mask.sum()), bbox=xywh(mask_box(mask))) if changed else m)
    boxes = np.array([xyxy(m.bbox) for m in cleaned], dtype=np.float64)
    return [cleaned[i] for i in box_nms(boxes, np.asarray(untouched), nms_thresh)]


def refine_proposals(
    predictor: Predictor,
    image: np.ndarray,
    proposals: np.ndarray,
    min_area: int = 10,
    stability_score_offset: float = 1.0,
) -> list[AutoMask]:
    """One mask per 8-connected piece (at least ``min_area`` pixels) of each label of
    ``proposals`` ((H, W) integer labels on ``image``'s grid, 0 = background), from the box
    around the piece; nothing is filtered (the proposal decided there is an object). Sorted by
    label, then by piece area, largest first; ``proposal_label`` names the label.
    """
    from scipy import ndimage

    proposals = np.asarray(proposals)
    image = np.asarray(image)
    if proposals.shape != image.shape[:2]:
        raise ValueError(f"proposals {proposals.shape} do not match the image {image.shape[:2]}")
    if not np.issubdtype(proposals.dtype, np.integer) and proposals.dtype != np.bool_:
        raise ValueError(f"proposals must be integer labels, got dtype {proposals.dtype}")
    boxes: list[list[float]] = []
    labels: list[int] = []
    for value in np.unique(proposals):
        if value == 0:
            continue
        pieces, count = ndimage.label(proposals == value, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
        for index in np.argsort(-sizes, kind="stable"):
            if sizes[index] < min_area:
                continue
            rows, cols = np.nonzero(pieces == index + 1)
            boxes.append([float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)])
            labels.append(int(value))
    if not boxes:
        return []
    predictor.set_image(image)
    prediction = predictor.predict(boxes=np.asarray(boxes), zoom=False)
    low, high = _stability_thresholds(predictor, stability_score_offset)
    size = (int(image.shape[0]), int(image.shape[1]))
    found = []
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        mask = prediction.masks[i]
        scores = prediction.score_maps(i)[0]
        union = int((scores > low).sum())
        found.append(
            AutoMask(
                segmentation=mask,
                area=int(mask.sum()),
                bbox=xywh(mask_box(mask)),
                predicted_iou=float(prediction.scores[i]),
                stability_score=float(np.float32((scores > high).sum()) / np.float32(union)) if union else float("nan"),
                prompt=box,
                crop_box=[0, 0, size[1], size[0]],
                proposal_label=label,
            )
        )
    return found
