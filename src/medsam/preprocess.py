"""Preprocessing contracts: how an image and its prompts enter a model, and how masks come out.

A contract is part of a checkpoint's identity: MedSAM's weights expect a square resize and min-max
scaling, SAM's expect a longest-side resize, padding and ImageNet statistics, SAM2's a square
resize and ImageNet statistics. Each loaded model
carries the name of its contract (``MedSAMModel.contract``); :func:`get_contract` returns it.

Coordinates everywhere are pixels, x to the right and y down; boxes are [x0, y0, x1, y1].

=========  ==========================================  ===================  ==========================
contract   image -> network input                      prompts              low-res logits -> mask
=========  ==========================================  ===================  ==========================
medsam     3 channels, bicubic anti-aliased resize     x * S/W, y * S/H     sigmoid, bilinear resize
           to S x S (skimage, as the release), uint8                        to (H, W), > 0.5
           truncation, min-max to [0, 1]
sam        3 channels uint8, bilinear resize of the    x * w'/W, y * h'/H   bilinear to S x S, crop to
           longest side to S (PIL), ImageNet mean/std                       (h', w'), bilinear to
           on 0-255, zero pad bottom/right                                  (H, W), logits > 0
lite       3 channels uint8, area resize of the        x, y * S/max(H, W)   crop to (h', w'), bilinear
           longest side to S, min-max to [0, 1],                            to (H, W), sigmoid > 0.5
           zero pad bottom/right
sam2       3 channels uint8 / 255, bilinear            x * S/W, y * S/H     bilinear to (H, W),
           anti-aliased resize to S x S (torchvision's                      logits > 0
           tensor Resize), ImageNet mean/std on 0-1
medsam2    3 channels uint8, bicubic resize to S x S   x * S/W, y * S/H     bilinear to (H, W),
           (Pillow, as MedSAM2's inference), / 255,                         logits > 0
           ImageNet mean/std on 0-1
=========  ==========================================  ===================  ==========================

(S = the model's input size, (H, W) the original image, (h', w') the resized image before padding.)
The lite contract's resize uses Pillow's box (area) filter for downscaling and bilinear for
upscaling; the LiteMedSAM release used OpenCV's INTER_AREA, which agrees up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .contract_names import CONTRACT_NAMES as CONTRACT_NAMES
from .intensity import minmax_to_uint8

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# The same statistics on 0-1 intensities, as SAM2 writes them.
IMAGENET_MEAN_UNIT = (0.485, 0.456, 0.406)
IMAGENET_STD_UNIT = (0.229, 0.224, 0.225)
# Contracts whose network input is the whole image warped to S x S (no padding).
_SQUARE = ("medsam", "sam2", "medsam2")


@dataclass(frozen=True)
class ImageGeometry:
    """Sizes that link an original image to the network input.

    ``original_size``: (H, W) of the user's image. ``resized_size``: (h', w') of the image inside
    the S x S network input before padding (equal to (S, S) for the square ``medsam`` contract).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, any dtype -> (H, W, 3) uint8.

    uint8 data are kept as they are. Other dtypes are min-max scaled to 0..255 and rounded (a
    constant image becomes zeros). Alpha is dropped; grey is repeated to 3 channels.
    Raises ValueError for other shapes and for NaN or infinite values.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image is too small: {image.shape[:2]}")
    image = minmax_to_uint8(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image)


def longest_side_size(height: int, width: int, target: int) -> tuple[int, int]:
    """(h', w') with the longest side equal to ``target``, rounded half up as SAM does."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _minmax(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x - x.min()) / np.clip(x.max() - x.min(), 1e-8, None)
    return out


def _chw_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


@dataclass(frozen=True)
class Contract:
    """A named preprocessing contract for a model whose square input side is ``input_size``.

    ``mask_threshold``: the threshold on :meth:`mask_scores` that makes a mask, where a model
    was calibrated to another one than the contract's standard (0.5 on probabilities, 0 on
    logits; :attr:`threshold`); None = the standard.
    """

    name: str
    input_size: int
    mask_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.name not in CONTRACT_NAMES:
            raise ValueError(f"unknown preprocessing contract {self.name!r}; known: {CONTRACT_NAMES}")
        t = self.mask_threshold
        if t is not None:
            on_probabilities = self.name in _PROBABILITY_SCORES
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ValueError(f"mask threshold must be a finite number, got {t!r}")
            if on_probabilities and not 0.0 < t < 1.0:
                raise ValueError(f"the {self.name!r} contract thresholds probabilities: 0 < threshold < 1, got {t}")

    # ------------------------------------------------------------------ image
    def geometry(self, original_size: tuple[int, int]) -> ImageGeometry:
        H, W = original_size
        S = self.input_size
        resized = (S, S) if self.name in _SQUARE else longest_side_size(H, W, S)
        return ImageGeometry((H, W), resized, S)

    def prepare_image(self, image: np.ndarray) -> tuple[torch.Tensor, ImageGeometry]:
        """Image (see :func:`to_rgb_uint8`) -> ((1, 3, S, S) float32 tensor, geometry)."""
        rgb = to_rgb_uint8(image)
        geom = self.geometry(rgb.shape[:2])
        S = self.input_size
        h, w = geom.resized_size
        if self.name == "medsam":
            from skimage.transform import resize

            resized = resize(rgb, (S, S), order=3, preserve_range=True, mode="constant", anti_aliasing=True).astype(
                np.uint8
            )
            return _chw_tensor(_minmax(resized.astype(np.float64))), geom
        if self.name in ("sam2", "medsam2"):
            return self._prepare_sam2(rgb), geom
        from PIL import Image

        pil = Image.fromarray(rgb)
        if self.name == "sam":
            resized = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))
            x = _chw_tensor(resized)
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = (x - mean) / std
        else:  # lite
            shrinking = h < rgb.shape[0] or w < rgb.shape[1]
            resized = np.asarray(pil.resize((w, h), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR))
            x = _chw_tensor(_minmax(resized.astype(np.float64)))
        return F.pad(x, (0, S - w, 0, S - h)), geom

    def _prepare_sam2(self, rgb: np.ndarray) -> torch.Tensor:
        S = self.input_size
        if self.name == "medsam2":
            from PIL import Image

            resized = np.asarray(Image.fromarray(rgb).resize((S, S), Image.Resampling.BICUBIC))
            x = _chw_tensor(resized.astype(np.float32) / 255.0)
        else:
            x = _chw_tensor(rgb.astype(np.float32) / 255.0)
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN_UNIT).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD_UNIT).view(1, 3, 1, 1)
        return (x - mean) / std

    # ---------------------------------------------------------------- prompts
    def coordinate_scale(self, geom: ImageGeometry) -> tuple[float, float]:
        """(sx, sy) such that network coordinates = (x * sx, y * sy)."""
        H, W = geom.original_size
        h, w = geom.resized_size
        return w / W, h / H

    def transform_coords(self, coords: np.ndarray, geom: ImageGeometry) -> np.ndarray:
        """(..., 2) pixel coordinates (x, y) of the original image -> network input frame."""
        sx, sy = self.coordinate_scale(geom)
        out: npt.NDArray[np.float64] = np.asarray(coords, dtype=np.float64).copy()
        out[..., 0] *= sx
        out[..., 1] *= sy
        return out

    def transform_boxes(self, boxes: np.ndarray, geom: ImageGeometry) -> np.ndarray:
        """(N, 4) boxes [x0, y0, x1, y1] of the original image -> network input frame."""
        boxes = np.asarray(boxes, dtype=np.float64)
        return self.transform_coords(boxes.reshape(-1, 2, 2), geom).reshape(-1, 4)

    # ------------------------------------------------------------------ masks
    def mask_scores(self, low_res_logits: torch.Tensor, geom: ImageGeometry) -> torch.Tensor:
        """(N, M, L, L) logits -> (N, M, H, W) per-pixel scores at the original resolution.

        The scores are probabilities for ``medsam``/``lite`` and logits for the others, so that
        ``scores > self.threshold`` is exactly the recipe's mask.
        """
        H, W = geom.original_size
        x = low_res_logits.float()
        if self.name == "medsam":
            return F.interpolate(torch.sigmoid(x), size=(H, W), mode="bilinear", align_corners=False)
        if self.name in ("sam2", "medsam2"):
            return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        h, w = geom.resized_size
        if self.name == "sam":
            S = self.input_size
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
            x = x[..., :h, :w]
            return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        # lite: low-res logits live at the input resolution (L == S); crop the padding away.
        L = x.shape[-1]
        x = x[..., : round(h * L / self.input_size), : round(w * L / self.input_size)]
        return torch.sigmoid(F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False))

    @property
    def standard_threshold(self) -> float:
        """The contract's own threshold: 0.5 on probabilities (``medsam``, ``lite``), else 0 on logits."""
        return 0.5 if self.name in _PROBABILITY_SCORES else 0.0

    @property
    def threshold(self) -> float:
        """Threshold applied to :meth:`mask_scores`: ``mask_threshold``, else :attr:`standard_threshold`."""
        return self.standard_threshold if self.mask_threshold is None else float(self.mask_threshold)


_PROBABILITY_SCORES = ("medsam", "lite")  # mask_scores are probabilities; logits for the others


def get_contract(name: str, input_size: int, mask_threshold: float | None = None) -> Contract:
    """The contract ``name`` (one of :data:`CONTRACT_NAMES`) for a model of input side S."""
    return Contract(name, input_size, mask_threshold)


def model_contract(model: Any, contract: str | None = None, mask_threshold: float | None = None) -> Contract:
    """The contract ``model`` segments with: its own (``model.contract``) or ``contract``, with
    ``mask_threshold`` if given, else the threshold the model was calibrated to
    (``model.mask_threshold``, kept in its checkpoint) when the contract is its own."""
    name = contract or model.contract
    if mask_threshold is None and name == model.contract:
        mask_threshold = getattr(model, "mask_threshold", None)
    return Contract(name, model.input_size, mask_threshold)
