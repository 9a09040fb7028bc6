"""The SAM2 family (SAM2, SAM2.1, MedSAM2): configurations and the assembled model.

:class:`SAM2Model` holds the parts under the official top-level names, so an official checkpoint's
``{"model": state_dict}`` loads with strict checking: ``image_encoder.{trunk, neck}`` (Hiera and
its FPN neck), ``sam_prompt_encoder`` (SAM's prompt encoder), ``sam_mask_decoder`` (SAM2's mask
decoder), ``memory_attention``, ``memory_encoder`` and the memory's parameters (``no_mem_embed``,
``no_mem_pos_enc``, ``maskmem_tpos_enc``, ``no_obj_ptr``, ``obj_ptr_proj``, ``obj_ptr_tpos_proj``,
``mask_downsample``, and for SAM2.1 ``no_obj_embed_spatial``).

For one image it answers the interface :class:`medsam.Predictor` uses
(:class:`medsam.predictor.PromptableModel`): :meth:`SAM2Model.embed_image` returns the image's
features as one (B, 1024, E, E) tensor (E = S / 16): channels 0-255 the lowest-resolution map with
``no_mem_embed`` added (as SAM2's image predictor does), 256-511 the projected (B, 64, 2E, 2E)
map and 512-1023 the projected (B, 32, 4E, 4E) map, both pixel-unshuffled to E x E (a lossless
rearrangement), so that embedding caches and the volume walk keep one tensor per slice.
:meth:`SAM2Model.decode` takes it apart again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, ConfigRecord
from .fpn_neck import FpnNeck
from .hiera import Hiera
from .prompt_encoder import PromptEncoder, box_corner_points
from .sam import DecoderOutput
from .sam2_decoder import SAM2MaskDecoder
from .sam2_memory import MemoryAttention, MemoryEncoder

PROMPT_DIM = 256  # the width of SAM2's prompt encoder and mask decoder
MEMORY_DIM = 64


@dataclass(frozen=True)
class SAM2Config(ConfigRecord):
    """Architecture of a SAM2-family model (the Hiera trunk's hyper-parameters, the input side,
    the SAM2 / SAM2.1 memory variant)."""

    name: str
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    img_size: int = 1024
    version: str = "2.1"  # "2" or "2.1"
    num_maskmem: int = 7
    default_contract: str = "sam2"
    family: str = "sam2"
    encoder: str = "hiera"

    @property
    def embedding_size(self) -> int:
        return self.img_size // 16


def _trunks() -> dict[str, dict[str, Any]]:
    # The released Hiera trunks (the configs of facebookresearch/sam2 1.1.0).
    return {
        "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9)),
        "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13)),
        "base_plus": dict(
            embed_dim=112,
            num_heads=2,
            stages=(2, 3, 16, 3),
            global_att_blocks=(12, 16, 20),
            window_pos_embed_bkg_spatial_size=(14, 14),
        ),
        "large": dict(
            embed_dim=144,
            num_heads=2,
            stages=(2, 6, 36, 4),
            global_att_blocks=(23, 33, 43),
            window_spec=(8, 4, 16, 8),
        ),
    }


SAM2_CONFIGS: dict[str, SAM2Config] = {
    **{f"sam2_hiera_{k}": SAM2Config(f"sam2_hiera_{k}", version="2", **v) for k, v in _trunks().items()},
    **{f"sam2.1_hiera_{k}": SAM2Config(f"sam2.1_hiera_{k}", **v) for k, v in _trunks().items()},
    # MedSAM2 (2025): SAM2.1 Hiera-T at 512 px (its sam2.1_hiera_t512.yaml), MedSAM2's contract.
    "medsam2": SAM2Config("medsam2", img_size=512, default_contract="medsam2", **_trunks()["tiny"]),
}


class SAM2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck: (B, 3, S, S) -> the three highest-resolution neck maps
    [(B, 256, S/4, S/4), (B, 256, S/8, S/8), (B, 256, S/16, S/16)] (SAM2 drops the S/32 level,
    ``scalp = 1``, after it has fed the top-down path)."""

    def __init__(self, config: SAM2Config) -> None:
        super().__init__()
        self.trunk = Hiera(
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            stages=config.stages,
            global_att_blocks=config.global_att_blocks,
            window_pos_embed_bkg_spatial_size=config.window_pos_embed_bkg_spatial_size,
            window_spec=config.window_spec,
        )
        self.neck = FpnNeck(self.trunk.channel_list, d_model=PROMPT_DIM)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = self.neck(self.trunk(x))
        return maps[:-1]


class SAM2Model(nn.Module):
    """A SAM2-family model under the official names (see the module docstring)."""

    preferred_precision: str = "fp32"
    is_untrained_default: bool = False
    # SAM2's image predictor returns its low-resolution logits clamped to this (masks come from
    # the unclamped ones); medsam.Predictor does the same for this model.
    low_res_logit_limit: float = 32.0

    def __init__(self, config: SAM2Config, contract: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.contract = contract or config.default_contract
        E = config.embedding_size
        S = config.img_size
        self.image_encoder = SAM2ImageEncoder(config)
        self.sam_prompt_encoder = PromptEncoder(PROMPT_DIM, (E, E), (S, S), mask_in_chans=16)
        self.sam_mask_decoder = SAM2MaskDecoder(PROMPT_DIM)
        self.memory_attention = MemoryAttention(PROMPT_DIM, MEMORY_DIM)
        self.memory_encoder = MemoryEncoder(PROMPT_DIM, MEMORY_DIM)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, PROMPT_DIM))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, PROMPT_DIM))
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, MEMORY_DIM))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, PROMPT_DIM))
        self.obj_ptr_proj = MLP(PROMPT_DIM, PROMPT_DIM, PROMPT_DIM, 3)
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        if config.version == "2.1":
            self.obj_ptr_tpos_proj: nn.Module = nn.Linear(PROMPT_DIM, MEMORY_DIM)
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, MEMORY_DIM))
        else:
            self.obj_ptr_tpos_proj = nn.Identity()

    # ------------------------------------------------------------- interface
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def input_size(self) -> int:
        return self.config.img_size

    @property
    def mask_input_size(self) -> int:
        return int(self.sam_prompt_encoder.mask_input_size[0])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """``sam_prompt_encoder`` under the v1 model's name."""
        return self.sam_prompt_encoder

    def embedding_extras(self) -> dict[str, torch.Tensor]:
        """The tensors outside ``image_encoder`` that :meth:`embed_image` uses (for embedding
        cache keys, :func:`medsam.embedding_cache.encoder_fingerprint`)."""
        decoder = self.sam_mask_decoder
        extras: dict[str, torch.Tensor] = {"no_mem_embed": self.no_mem_embed}
        for conv in ("conv_s0", "conv_s1"):
            for name, tensor in getattr(decoder, conv).state_dict().items():
                extras[f"sam_mask_decoder.{conv}.{name}"] = tensor
        return extras

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (lowest-resolution map (B, 256, E, E) before ``no_mem_embed``,
        feat_s1 (B, 64, 2E, 2E), feat_s0 (B, 32, 4E, 4E)), as SAM2's ``forward_image``."""
        s0, s1, s2 = self.image_encoder(images)
        feat_s0, feat_s1 = self.sam_mask_decoder.project_high_res(s0, s1)
        return s2, feat_s1, feat_s0

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, 1024, E, E) packed features (module docstring)."""
        s2, feat_s1, feat_s0 = self.image_features(images)
        image_embed = s2 + self.no_mem_embed.reshape(1, -1, 1, 1)
        return pack_features(image_embed, feat_s1, feat_s0)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        all_masks: bool = False,
    ) -> DecoderOutput:
        """As :meth:`medsam.model.MedSAMModel.decode` on packed features; also the object-score
        logits. A box and points of one prompt are given together, box corners first (SAM2's
        image predictor's order)."""
        image_embed, feat_s1, feat_s0 = unpack_features(image_embeddings)
        points = _box_and_points(boxes, points)
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        logits, iou, obj = self.sam_mask_decoder(
            image_embed,
            self.sam_prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=multimask_output,
            high_res=(feat_s0, feat_s1),
            all_masks=all_masks,
        )
        return DecoderOutput(logits=logits, iou=iou, object_score_logits=obj)


def _box_and_points(
    boxes: torch.Tensor | None, points: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Boxes as corner points (labels 2, 3) before the clicked points."""
    if boxes is None:
        return points
    corners, labels = box_corner_points(boxes)
    if points is None:
        return corners, labels
    return torch.cat([corners, points[0].to(corners.dtype)], dim=1), torch.cat(
        [labels, points[1].to(labels.dtype)], dim=1
    )


def pack_features(image_embed: torch.Tensor, feat_s1: torch.Tensor, feat_s0: torch.Tensor) -> torch.Tensor:
    """(B, 256, E, E), (B, 64, 2E, 2E), (B, 32, 4E, 4E) -> (B, 1024, E, E)."""
    return torch.cat([image_embed, F.pixel_unshuffle(feat_s1, 2), F.pixel_unshuffle(feat_s0, 4)], dim=1)


def unpack_features(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_features`."""
    if packed.shape[1] != 4 * PROMPT_DIM:
        raise ValueError(f"SAM2 features have {4 * PROMPT_DIM} channels, got {packed.shape[1]}")
    image_embed = packed[:, :PROMPT_DIM]
    feat_s1 = F.pixel_shuffle(packed[:, PROMPT_DIM : 2 * PROMPT_DIM], 2)
    feat_s0 = F.pixel_shuffle(packed[:, 2 * PROMPT_DIM :], 4)
    return image_embed, feat_s1, feat_s0


def build_sam2(config: SAM2Config | str, contract: str | None = None) -> SAM2Model:
    """A randomly initialised SAM2-family model from a config or a name of :data:`SAM2_CONFIGS`."""
    if isinstance(config, str):
        if config not in SAM2_CONFIGS:
            raise ValueError(f"unknown SAM2 model {config!r}; known: {sorted(SAM2_CONFIGS)}")
        config = SAM2_CONFIGS[config]
    return SAM2Model(config, contract)
