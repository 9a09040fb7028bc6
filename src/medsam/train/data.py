"""Training samples from the curated corpus (:mod:`medsam.corpus`): one (2D slice, object) row
of the manifest each.

The dataset is lazy: an item reads one slice file. Images are prepared exactly as the Predictor
prepares them at inference (:meth:`medsam.preprocess.Contract.prepare_image`, through its faster
equivalent :func:`medsam.preprocess_fast.prepare_image_fast`), boxes are mapped with
:meth:`Contract.transform_boxes`, so a trained model is used with the same contract it was trained
with. Augmentations act on the original image and mask, before the contract.

Randomness: every random choice of an item (box jitter, points, mask prompt, flips, intensity) is
drawn from ``numpy.random.default_rng([seed, epoch, index])``. Items are addressed by
``(epoch, index)`` keys, produced by :class:`EpochSampler`, so a sample is the same whichever
process, worker or run (interrupted or not) makes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from ..corpus import ManifestRow, group_by_slice, load_slice, mask_bbox
from ..preprocess import Contract, ImageGeometry
from ..preprocess_fast import prepare_image_fast

if TYPE_CHECKING:
    from .embedding_store import LesionViews


def jitter_box(
    box: np.ndarray,
    rng: np.random.Generator,
    limit: tuple[float, float],
    mode: str = "fixed",
    max_shift: float = 0.0,
    fraction: float = 0.0,
) -> np.ndarray:
    """Move each side of a network-frame box outwards at random and clip it to the image.

    Args:
        box: [x0, y0, x1, y1] in network input pixels.
        limit: (width, height) of the image inside the network input (the box is clipped to
            [0, width] x [0, height]).
        mode: ``fixed``: each side by ``randint(0, max_shift)`` pixels (MedSAM: 20 at 1024);
            ``proportional``: by ``randint(0, fraction x side length)`` pixels.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if mode == "fixed":
        hi = [int(round(max_shift))] * 4
    else:
        w, h = x1 - x0, y1 - y0
        hi = [int(fraction * w), int(fraction * h), int(fraction * w), int(fraction * h)]
    d = [int(rng.integers(0, m + 1)) if m > 0 else 0 for m in hi]
    W, H = limit
    return np.array(
        [max(0.0, x0 - d[0]), max(0.0, y0 - d[1]), min(W, x1 + d[2]), min(H, y1 + d[3])],
        dtype=np.float64,
    )


def mask_to_input_frame(mask: np.ndarray, geom: ImageGeometry) -> torch.Tensor:
    """(H, W) binary mask -> (1, S, S) uint8 in the network input frame (nearest, zero padding).

    For the ``medsam`` contract this is the mask resized to S x S; for the padded contracts the
    mask is resized to the (h', w') image area and padded like the image.
    """
    h, w = geom.resized_size
    S = geom.input_size
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None].float()
    t = F.interpolate(t, size=(h, w), mode="nearest-exact")
    t = F.pad(t, (0, S - w, 0, S - h))
    return t[0].to(torch.uint8)


def augment_intensity(
    image: np.ndarray, rng: np.random.Generator, gamma: Sequence[float] | None, contrast: Sequence[float] | None
) -> np.ndarray:
    """Random gamma (on [0, 1] intensities) and contrast (around the mean) of a uint8 image."""
    x = image.astype(np.float64) / 255.0
    if gamma is not None:
        g = float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
        x = x**g
    if contrast is not None:
        c = float(rng.uniform(contrast[0], contrast[1]))
        x = x.mean() + c * (x - x.mean())
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PromptOptions:
    """How prompts are made for a sample (see :class:`medsam.train.config.DataSection`)."""

    box: bool = True
    jitter: float = 20.0
    jitter_mode: str = "fixed"
    jitter_fraction: float = 0.1
    points: int = 0
    negative_points: int = 0
    mask_prompt_prob: float = 0.0
    mask_prompt_logit: float = 8.0
    clicks: int = 0


@dataclass(frozen=True)
class AugmentOptions:
    flip_prob: float = 0.0
    gamma: tuple[float, float] | None = None
    contrast: tuple[float, float] | None = None
    zoom_prob: float = 0.0
    zoom_context: tuple[float, float] = (2.0, 4.0)
    zoom_min_side: int = 32
    lesion_prob: float = 0.0
    lesion_kinds: tuple[str, ...] = ("tumour", "cyst", "nodule")
    lesion_weights: tuple[float, ...] | None = None  # relative, one per lesion kind; None: uniform

    @property
    def active(self) -> bool:
        return self.flip_prob > 0 or self.gamma is not None or self.contrast is not None


class SegmentationDataset(Dataset):
    """Map-style dataset of (slice, object) samples for training.

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` = epoch 0) returns a dict:

    - ``image``: (3, S, S) float32, the contract's network input;
    - ``target``: (1, S, S) uint8 object mask in the network input frame (loss resolution);
    - ``box``: (4,) float32 [x0, y0, x1, y1] in the network frame, jittered (if ``box``);
    - ``points`` (P, 2) float32 (x, y) network frame and ``point_labels`` (P,) int64
      (1 inside, 0 outside, -1 padding) when points are asked for;
    - ``mask_input`` (1, L, L) float32 logits and ``has_mask`` () bool when mask prompts are on;
    - ``clicks`` (K, 2) float32 (x, y) network frame and ``click_labels`` (K,) int64 when
      ``prompts.clicks = K``: corrective clicks given with the box, each positive (inside the
      object) or negative (inside the box, outside the object) with probability 1/2. The training
      loop passes the first k of them, the same k for the whole batch (see
      :func:`clicks_for_step`).

    Args:
        corpus: corpus folder. rows: the manifest rows of one split.
        contract: the model's preprocessing contract. mask_input_size: L (4 x embedding size).
        train: draw jitter and augmentations; ``False`` gives the exact ground-truth box.
        seed: the run's seed.
        store: a :class:`medsam.train.embedding_store.EmbeddingStore` (decoder-only training):
            items carry ``embedding`` (C, E, E) instead of ``image``; pixel augmentations are
            not applied, and with ``augment.zoom_prob`` an object uses the store's deterministic
            zoom crop (made with ``store_zoom``) instead of a random one.
    """

    def __init__(
        self,
        corpus: str | Path,
        rows: Sequence[ManifestRow],
        contract: Contract,
        mask_input_size: int,
        prompts: PromptOptions = PromptOptions(),
        augment: AugmentOptions = AugmentOptions(),
        train: bool = True,
        seed: int = 0,
        store=None,
        store_zoom=None,
        store_lesions=None,
    ) -> None:
        self.store = store  # an EmbeddingStore: items carry "embedding" instead of "image"
        self.store_zoom = store_zoom  # the ZoomPolicy the store's crops were made with
        self.store_lesions = store_lesions  # the LesionViews the store's lesion copies were made with
        self._lesion_masks: dict[tuple[str, int], tuple[np.ndarray, tuple[int, int]]] = {}  # packed bits
        self.corpus = Path(corpus)
        self.rows = list(rows)
        self.contract = contract
        self.mask_input_size = int(mask_input_size)
        self.prompts = prompts
        self.augment = augment
        self.train = train
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, (tuple, list)) else (0, key)
        rng = self.rng(epoch, index)
        row = self.rows[index]
        image, label, _ = load_slice(self.corpus, row)
        mask = label == row.label
        if self.store is not None:  # precomputed embeddings: the whole slice or its zoom crop
            from .embedding_store import lesion_key, lesion_zoom_key, object_window, whole_key, zoom_key

            key, crop_key = whole_key(row), zoom_key(row)
            a = self.augment
            lesions = self.store_lesions if self.train and a.lesion_prob > 0 else None
            if lesions is not None and rng.random() < a.lesion_prob:
                variant = self._lesion_variant(row, rng)
                if lesion_key(row, variant) in self.store:
                    mask = self._stored_lesion_mask(row, image, label, variant)
                    key, crop_key = lesion_key(row, variant), lesion_zoom_key(row, variant)
            if self.train and a.zoom_prob > 0 and crop_key in self.store and rng.random() < a.zoom_prob:
                y0, y1, x0, x1 = object_window(mask, self.store_zoom)
                mask, key = mask[y0:y1, x0:x1], crop_key
            geom = self.contract.geometry(mask.shape)
            sample: dict = {"embedding": self.store[key], "target": mask_to_input_frame(mask, geom)}
        else:
            a = self.augment
            if self.train and a.lesion_prob > 0 and image.ndim == 2 and rng.random() < a.lesion_prob:
                from .lesions import paste_lesion

                lesion = paste_lesion(image, label, rng, a.lesion_kinds, a.lesion_weights)
                image, mask = lesion.image, lesion.mask
            if self.train and a.zoom_prob > 0 and rng.random() < a.zoom_prob:
                image, mask = self._zoom(image, mask, rng)
            if self.train and a.active:
                image, mask = self._augment(image, mask, rng)
            x, geom = prepare_image_fast(self.contract, image)
            sample = {"image": x[0], "target": mask_to_input_frame(mask, geom)}
        S = geom.input_size
        h, w = geom.resized_size
        p = self.prompts
        if p.box:
            box = self.contract.transform_boxes(mask_bbox(mask)[None], geom)[0]
            if self.train:
                box = jitter_box(
                    box,
                    rng,
                    (float(w), float(h)),
                    p.jitter_mode,
                    max_shift=p.jitter * S / 1024.0,
                    fraction=p.jitter_fraction,
                )
            sample["box"] = torch.as_tensor(box, dtype=torch.float32)
        if p.points or p.negative_points:
            pts, labels = self._points(mask, rng)
            sample["points"] = torch.as_tensor(self.contract.transform_coords(pts, geom), dtype=torch.float32)
            sample["point_labels"] = torch.as_tensor(labels, dtype=torch.int64)
        if p.clicks:
            pts, labels = self._clicks(mask, rng)
            sample["clicks"] = torch.as_tensor(self.contract.transform_coords(pts, geom), dtype=torch.float32)
            sample["click_labels"] = torch.as_tensor(labels, dtype=torch.int64)
        if p.mask_prompt_prob > 0:
            use = bool(rng.random() < p.mask_prompt_prob)
            sample["has_mask"] = torch.tensor(use)
            sample["mask_input"] = (
                self._mask_prompt(mask, geom, rng)
                if use
                else torch.zeros(1, self.mask_input_size, self.mask_input_size)
            )
        return sample

    # ------------------------------------------------------------------ parts
    def _lesion_variant(self, row: ManifestRow, rng: np.random.Generator) -> int:
        """Which of the store's lesion copies of ``row``'s slice a sample takes: uniformly, or by
        ``augment.lesion_weights`` of the copies' kinds (a kind is favoured only on the slices
        that have a copy of it; uniform where no copy has weight)."""
        lesions, a = self.store_lesions, self.augment
        if a.lesion_weights is None:
            return int(rng.integers(lesions.variants))
        weight = dict(zip(a.lesion_kinds, a.lesion_weights, strict=True))
        w = np.array([weight.get(lesions.kind(row.path, k), 0.0) for k in range(lesions.variants)])
        if w.sum() <= 0:
            return int(rng.integers(lesions.variants))
        return int(rng.choice(lesions.variants, p=w / w.sum()))

    def _stored_lesion_mask(self, row: ManifestRow, image: np.ndarray, label: np.ndarray, variant: int) -> np.ndarray:
        """The mask of the store's lesion copy ``variant`` of ``row``'s slice (made once, kept)."""
        kept = self._lesion_masks.get((row.path, variant))
        if kept is None:
            mask = self.store_lesions.lesion(image, label, row.path, variant).mask
            kept = self._lesion_masks[(row.path, variant)] = (np.packbits(mask, axis=None), mask.shape)
        bits, shape = kept
        return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)

    def _augment(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        a = self.augment
        if a.flip_prob > 0:
            if rng.random() < a.flip_prob:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if rng.random() < a.flip_prob:
                image, mask = image[::-1], mask[::-1]
        if a.gamma is not None or a.contrast is not None:
            image = augment_intensity(image, rng, a.gamma, a.contrast)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def _zoom(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """A square crop around the object, as :func:`medsam.zoom.zoom_window` makes at inference.

        The crop side is a random ``zoom_context`` multiple of the object's longest box side
        (at least ``zoom_min_side``), its centre moved at random while the box stays inside.
        Objects whose crop would not be clearly smaller than the image are left whole.
        """
        from ..zoom import zoom_window

        a = self.augment
        x0, y0, x1, y1 = mask_bbox(mask)
        context = float(rng.uniform(a.zoom_context[0], a.zoom_context[1]))
        side = max(context * (max(x1 - x0, y1 - y0) + 1.0), float(a.zoom_min_side))
        H, W = mask.shape
        if side > 0.75 * max(H, W):
            return image, mask
        slack_y = max(0.0, (side - (y1 - y0 + 1.0)) / 2.0)
        slack_x = max(0.0, (side - (x1 - x0 + 1.0)) / 2.0)
        offset = (float(rng.uniform(-slack_y, slack_y)), float(rng.uniform(-slack_x, slack_x)))
        wy0, wy1, wx0, wx1 = zoom_window((x0, y0, x1, y1), (H, W), context, a.zoom_min_side, offset)
        return image[wy0:wy1, wx0:wx1], mask[wy0:wy1, wx0:wx1]

    def _clicks(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``prompts.clicks`` clicks (x, y) original pixels: positive inside the object, negative
        in its bounding box (grown by 2 pixels) outside it, each kind with probability 1/2 (the
        other when a kind has no pixel)."""
        x0, y0, x1, y1 = (int(v) for v in mask_bbox(mask))
        H, W = mask.shape
        ys0, xs0 = max(0, y0 - 2), max(0, x0 - 2)
        window = mask[ys0 : min(H, y1 + 3), xs0 : min(W, x1 + 3)]
        regions = {1: np.nonzero(window), 0: np.nonzero(~window)}
        coords = np.zeros((self.prompts.clicks, 2), dtype=np.float64)
        labels = np.zeros(self.prompts.clicks, dtype=np.int64)
        for i in range(self.prompts.clicks):
            kind = 1 if rng.random() < 0.5 else 0
            if len(regions[kind][0]) == 0:
                kind = 1 - kind
            ys, xs = regions[kind]
            j = int(rng.integers(len(ys)))
            coords[i] = (xs[j] + xs0, ys[j] + ys0)
            labels[i] = kind
        return coords, labels

    def _points(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (x, y) of positive points inside and negative points outside the mask."""
        coords, labels = [], []
        for count, region, value in (
            (self.prompts.points, mask, 1),
            (self.prompts.negative_points, ~mask, 0),
        ):
            if count == 0:
                continue
            ys, xs = np.nonzero(region)
            if len(ys) == 0:  # nothing to sample from: padding points ("not a point")
                coords.append(np.zeros((count, 2)))
                labels.append(np.full(count, -1))
                continue
            pick = rng.choice(len(ys), size=count, replace=len(ys) < count)
            coords.append(np.stack([xs[pick], ys[pick]], axis=1).astype(np.float64))
            labels.append(np.full(count, value))
        return np.concatenate(coords), np.concatenate(labels)

    def _mask_prompt(self, mask: np.ndarray, geom: ImageGeometry, rng: np.random.Generator) -> torch.Tensor:
        """A perturbed ground truth (random dilation or erosion) as (1, L, L) low-res logits."""
        from scipy import ndimage

        L = self.mask_input_size
        low = F.interpolate(mask_to_input_frame(mask, geom)[None].float(), size=(L, L), mode="area")[0, 0]
        m = (low > 0.5).numpy()
        radius = int(rng.integers(0, 3))
        if radius:
            op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
            m = op(m, iterations=radius)
        logit = self.prompts.mask_prompt_logit
        return torch.from_numpy(np.where(m, logit, -logit).astype(np.float32))[None]


class EpochSampler(Sampler):
    """The sample order of one epoch for one rank, as ``(epoch, index)`` keys, resumable.

    The order is :class:`torch.utils.data.DistributedSampler`'s (a permutation seeded by
    ``seed + epoch``, then every ``num_replicas``-th index from ``rank``); one process is the case
    ``num_replicas = 1``. Hence step ``s`` of an epoch uses the samples
    ``perm[s * G : (s + 1) * G]`` (G = the global batch) whatever the number of processes.
    :meth:`set_epoch` with ``start`` skips the first ``start`` samples of this rank's share, so a
    resumed run continues exactly where the interrupted one stopped. ``pad_to``: the epoch is
    lengthened to that many samples by repeating its order from the start (a rank reading only
    its own shards pads to the largest rank's share, so that every rank makes the same steps).
    """

    def __init__(
        self,
        size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        pad_to: int | None = None,
    ) -> None:
        self._inner = DistributedSampler(
            range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.pad_to = max(len(self._inner), int(pad_to or 0))
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_epoch(self) -> int:
        """This rank's samples per epoch (before skipping)."""
        return self.pad_to

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)
        self._inner.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self._inner)
        while len(order) < self.pad_to:  # padded as DistributedSampler pads: from the start again
            order += order[: self.pad_to - len(order)]
        for i, index in enumerate(order):
            if i >= self.start:
                yield (self.epoch, int(index))

    def __len__(self) -> int:
        return max(0, self.pad_to - self.start)


def clicks_for_step(seed: int, step: int, max_clicks: int, prob: float) -> int:
    """How many of each sample's clicks the batch of optimiser step ``step`` uses (0..max_clicks).

    With probability ``1 - prob`` none (box only, as at inference without corrections), else a
    uniform 1..max_clicks. The same for every sample and rank of the step, so a batch has one
    prompt shape and resumed runs repeat it.
    """
    if max_clicks <= 0 or prob <= 0:
        return 0
    rng = np.random.default_rng([int(seed), 0xC11C, int(step)])
    if rng.random() >= prob:
        return 0
    return int(rng.integers(1, max_clicks + 1))


def collate(samples: list[dict]) -> dict:
    """Stack the tensors of a list of samples (all samples carry the same keys)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# ------------------------------------------------------------------ validation: one item per slice
@dataclass
class SliceObjects:
    """All objects of one validation slice, in original pixels (no jitter)."""

    image: torch.Tensor  # (3, S, S) the contract's network input
    original_size: tuple[int, int]
    boxes: np.ndarray  # (N, 4) inclusive [x0, y0, x1, y1] from the ground-truth masks
    masks: np.ndarray  # (N, H, W) bool ground truth
    spacing: tuple[float, float]
    modality: str
    labels: list[int]
    pixels: np.ndarray | None = None  # the original image, where the validation zooms


class ValidationSlices(Dataset):
    """Validation items grouped by slice, so each image is embedded once for all its objects.

    With ``lesions``, each grey-level slice also gives ``lesions.variants`` items of one synthetic
    lesion each (modality ``<modality> lesion``), after all the plain slices. ``pixels``: items
    carry the original image (for zoomed crops).

    ``part = (rank, world_size)``: only the items ``rank, rank + world_size, ...`` of the whole
    list; ``slice_ids[i]`` is item ``i``'s position in the whole list."""

    def __init__(
        self,
        corpus: str | Path,
        rows: Sequence[ManifestRow],
        contract: Contract,
        part: tuple[int, int] = (0, 1),
        lesions: LesionViews | None = None,
        pixels: bool = False,
    ) -> None:
        self.corpus = Path(corpus)
        self.contract = contract
        self.lesions = lesions
        self.pixels = pixels
        rank, world = part
        groups = list(group_by_slice(rows).values())
        items: list[tuple[list[ManifestRow], int | None]] = [(g, None) for g in groups]
        if lesions is not None:
            grey = [g for g in groups if load_slice(self.corpus, g[0])[0].ndim == 2]
            items += [(g, k) for g in grey for k in range(lesions.variants)]
        self.slice_ids = list(range(rank, len(items), world))
        self.items = [items[i] for i in self.slice_ids]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> SliceObjects:
        rows, variant = self.items[i]
        image, label, spacing = load_slice(self.corpus, rows[0])
        modality = rows[0].modality
        if variant is None:
            masks = np.stack([label == r.label for r in rows])
            labels = [r.label for r in rows]
        else:
            assert self.lesions is not None
            lesion = self.lesions.lesion(image, label, rows[0].path, variant)
            image, masks, labels, modality = lesion.image, lesion.mask[None], [0], f"{modality} lesion"
        boxes = np.stack([mask_bbox(m) for m in masks])
        # A one-pixel-wide object has x1 == x0: the Predictor wants x1 > x0, so close the box on
        # the far side (an exclusive end, which the Predictor accepts up to the image edge).
        H, W = label.shape
        boxes[:, 2] = np.where(boxes[:, 2] > boxes[:, 0], boxes[:, 2], np.minimum(boxes[:, 0] + 1, W))
        boxes[:, 3] = np.where(boxes[:, 3] > boxes[:, 1], boxes[:, 3], np.minimum(boxes[:, 1] + 1, H))
        x, geom = prepare_image_fast(self.contract, image)
        pixels = image if self.pixels else None
        return SliceObjects(x[0], geom.original_size, boxes, masks, spacing, modality, labels, pixels)


def steps_per_epoch(samples_per_rank: int, batch_size: int, accumulation: int) -> int:
    """Optimiser steps in one epoch (incomplete last step dropped, identically on every rank)."""
    return math.floor(samples_per_rank / (batch_size * accumulation))
