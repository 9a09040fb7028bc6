"""Segmentation losses of the MedSAM recipes, on logits upsampled to the network input size.

Every term is computed per object (one mask per sample) and then averaged over the batch, so the
loss of a global batch split over several processes (DDP averages gradients) is the loss of the
same batch in one process.

- ``focal_dice`` (the paper, the seed text, SAM and MedSAM2): ``20 x focal + 1 x Dice``. The focal
  loss is SAM's unnormalised sigmoid focal loss (alpha 0.25, gamma 2): the per-pixel focal terms
  averaged over the pixels, *not* divided by the number of foreground pixels. The Dice loss is
  ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` on probabilities.
- ``dice_bce`` (the released training code): MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)``
  (``1 - (2 sum(p t) + 1e-5) / (sum p^2 + sum t^2 + 1e-5)``) + ``BCEWithLogits`` (mean).
- both: ``iou_weight x MSE(predicted IoU, IoU of the thresholded mask)`` so the IoU head learns
  (LiteMedSAM; the release never trained it). The actual IoU is a target (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def upsample_logits(low_res_logits: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, L, L) logits -> (B, 1, S, S) float32, bilinear, as MedSAM computes its loss."""
    return F.interpolate(low_res_logits.float(), size=(size, size), mode="bilinear", align_corners=False)


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """(B, ...) logits and 0/1 targets -> (B,) mean over pixels of the focal loss (SAM's form).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t = alpha`` on foreground and
    ``1 - alpha`` on background (``alpha < 0`` turns the weighting off).
    """
    logits, targets = logits.flatten(1).float(), targets.flatten(1).float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, squared: bool = False) -> torch.Tensor:
    """(B, ...) logits and 0/1 targets -> (B,) soft Dice loss on sigmoid probabilities.

    ``1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)``; with ``squared`` the denominator is
    ``sum p^2 + sum t^2`` (MONAI's ``squared_pred``).
    """
    p = torch.sigmoid(logits.flatten(1).float())
    t = targets.flatten(1).float()
    inter = (p * t).sum(1)
    denom = (p * p).sum(1) + (t * t).sum(1) if squared else p.sum(1) + t.sum(1)
    return 1 - (2 * inter + smooth) / (denom + smooth)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean binary cross-entropy with logits."""
    return F.binary_cross_entropy_with_logits(
        logits.flatten(1).float(), targets.flatten(1).float(), reduction="none"
    ).mean(1)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) IoU of the thresholded masks (logits > 0) with the 0/1 targets; 1 when both are empty."""
    pred = logits.flatten(1) > 0
    t = targets.flatten(1) > 0.5
    inter = (pred & t).sum(1).float()
    union = (pred | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LossOutput:
    """``total``: scalar to back-propagate; ``terms``: unweighted batch means (detached)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class SegmentationLoss:
    """The configured loss: ``SegmentationLoss(kind, focal_weight=20, dice_weight=1, ...)``.

    Call with (B, 1, L, L) low-resolution logits, (B, 1) predicted IoU and (B, 1, S, S) targets;
    the logits are upsampled to S x S first.
    """

    def __init__(
        self,
        kind: str = "focal_dice",
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if kind not in ("focal_dice", "dice_bce"):
            raise ValueError(f"unknown loss kind {kind!r}: focal_dice or dice_bce")
        self.kind = kind
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.iou_weight = iou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, section) -> SegmentationLoss:
        return cls(
            section.kind,
            section.focal_weight,
            section.dice_weight,
            section.bce_weight,
            section.iou_weight,
            section.focal_alpha,
            section.focal_gamma,
        )

    def __call__(self, low_res_logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor) -> LossOutput:
        targets = targets.float()
        logits = upsample_logits(low_res_logits, targets.shape[-1])
        terms: dict[str, torch.Tensor] = {}
        if self.kind == "focal_dice":
            focal = sigmoid_focal_loss(logits, targets, self.focal_alpha, self.focal_gamma).mean()
            dice = dice_loss(logits, targets).mean()
            total = self.focal_weight * focal + self.dice_weight * dice
            terms.update(focal=focal, dice=dice)
        else:
            dice = dice_loss(logits, targets, smooth=1e-5, squared=True).mean()
            bce = bce_loss(logits, targets).mean()
            total = self.dice_weight * dice + self.bce_weight * bce
            terms.update(dice=dice, bce=bce)
        actual = mask_iou(logits, targets)
        iou_mse = ((iou_pred[:, 0].float() - actual) ** 2).mean()
        # Always in the graph (weight 0 included) so DDP sees a gradient for the IoU head.
        total = total + self.iou_weight * iou_mse
        terms.update(iou_mse=iou_mse, iou=actual.mean())
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})
