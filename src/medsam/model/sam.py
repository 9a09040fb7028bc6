"""The assembled promptable segmentation model (image encoder + prompt encoder + mask decoder).

Preprocessing is deliberately not part of the module: it lives in :mod:`medsam.preprocess` as a
named contract that travels with the model (``MedSAMModel.contract``), so a checkpoint is always
paired with the preprocessing it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

if TYPE_CHECKING:  # the registry imports this module
    from .registry import ModelConfig


@dataclass(frozen=True)
class DecoderOutput:
    """Raw decoder output. ``logits``: (B, M, 4E, 4E); ``iou``: (B, M); SAM2-family models also
    give ``object_score_logits`` (B, 1): positive where the object is present."""

    logits: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor | None = None


class MedSAMModel(nn.Module):
    """Image encoder, prompt encoder and mask decoder under the official top-level names.

    Attributes:
        config: the :class:`medsam.model.registry.ModelConfig` the model was built from.
        contract: name of the preprocessing contract (``"medsam"``, ``"sam"`` or ``"lite"``).
        preferred_precision: the :class:`medsam.Predictor` precision when none is asked for
            (``"auto"`` for the embedded default model).
        is_untrained_default: the seeded random stand-in for missing bundled weights.
    """

    preferred_precision: str = "fp32"
    is_untrained_default: bool = False

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        config: ModelConfig,
        contract: str,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
        self.contract = contract
        self.mask_threshold: float | None = None  # calibrated mask threshold (checkpoint metadata)

    @property
    def input_size(self) -> int:
        """Side of the square network input (1024 for ViT models, 256 for LiteMedSAM)."""
        return self.config.img_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def mask_input_size(self) -> int:
        """Side L of the (B, 1, L, L) mask prompt (4E: 256 for the official models)."""
        return int(self.prompt_encoder.mask_input_size[0])

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, 256, E, E) embeddings."""
        return self.image_encoder(images)

    def encoder_in(self, dtype: torch.dtype) -> nn.Module:
        """The image encoder with its weights in ``dtype`` (e.g. ``torch.bfloat16``), made once and
        kept (not a submodule: it is in no state dict); BatchNorm statistics stay in float32 so
        that folding them into the convolutions loses nothing. Made again when any weight of the
        model has changed in place since (training, ``load_state_dict``)."""
        import copy

        versions = tuple(p._version for p in self.image_encoder.parameters())
        cache = self.__dict__.setdefault("_encoders_in", {})
        hit = cache.get(dtype)
        if hit is not None and hit[0] == versions:
            return hit[1]
        low = copy.deepcopy(self.image_encoder).eval()
        for module in low.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point():
                    setattr(module, name, buf.to(dtype))
        for param in low.parameters():
            param.requires_grad_(False)
        cache[dtype] = (versions, low)
        return low

    def decode(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        all_masks: bool = False,
    ) -> DecoderOutput:
        """Prompts in network-input coordinates -> low-resolution logits and IoU predictions.

        Args:
            image_embeddings: (1 or B, 256, E, E).
            boxes: (B, 4) [x0, y0, x1, y1]; points: ((B, P, 2), (B, P)); mask_input: (B, 1, 4E, 4E).
            multimask_output: the three alternative masks (tokens 1..3) instead of token 0's;
            all_masks: all four in one decoder pass, token 0 first.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        logits, iou = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            all_masks=all_masks,
        )
        return DecoderOutput(logits=logits, iou=iou)
