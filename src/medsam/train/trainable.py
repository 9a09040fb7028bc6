"""What is trained: building the run's model and choosing its trainable parameters (``train.mode``).

=========  ====================================================================================
mode       trainable
=========  ====================================================================================
full       image encoder + mask decoder; prompt encoder frozen (MedSAM's recipe)
decoder    mask decoder only; image embeddings are computed under ``torch.no_grad``
lora       LoRA adapters on the encoder's ``lora.targets`` linear layers + mask decoder
           (+ the encoder's neck with ``lora.train_neck``); every original encoder weight frozen
adapter    Med-SA's two adapters in every ViT block + mask decoder; every original encoder
           weight frozen; the model keeps its adapters (``ModelConfig.adapter``) when saved
=========  ====================================================================================

:class:`SegmentationStep` is the module the optimiser (and DDP) sees: images and prompts in, low-res
logits and IoU predictions out, following :meth:`medsam.model.MedSAMModel.decode`.
"""

from __future__ import annotations

import dataclasses
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.adapters import adapter_parameters, add_medsa_adapters
from ..model.registry import CONFIGS, ModelConfig, build_model
from ..model.sam import MedSAMModel
from .lora import apply_lora


def build_initial_model(section, seed: int) -> MedSAMModel:
    """The model of the ``model`` config section: loaded from ``checkpoint`` or randomly built.

    Random initialisation is seeded by ``seed`` so every rank (and a rerun) starts identically.
    """
    torch.manual_seed(seed)
    if section.checkpoint:
        from ..weights import load_model

        if section.config_overrides:
            raise ValueError("model.config_overrides applies to random initialisation only, not to a checkpoint")
        model = load_model(section.checkpoint, contract=section.contract, device="cpu")
        if not isinstance(model, MedSAMModel):
            raise ValueError(
                f"{section.checkpoint} holds a {model.config.name} model: this training takes SAM, MedSAM and "
                "LiteMedSAM models (SAM-Med3D trains with model.arch: sam_med3d, SAM2-family models with clips.volumes)"
            )
        if section.arch and model.config.name != section.arch:
            raise ValueError(
                f"model.arch is {section.arch!r} but {section.checkpoint} holds a {model.config.name} model; "
                f"set model.arch: {model.config.name} (or null to take the checkpoint's architecture)"
            )
        # A calibrated mask threshold belongs to the weights it was chosen for: the trained model
        # masks at its contract's standard threshold until it is calibrated again.
        model.mask_threshold = None
        return model.train()
    if section.arch not in CONFIGS:
        raise ValueError(f"unknown model.arch {section.arch!r}; known: {sorted(CONFIGS)}")
    config = CONFIGS[section.arch]
    if section.config_overrides:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.config_overrides.items()}
        unknown = set(values) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ValueError(f"model.config_overrides: unknown ModelConfig fields {sorted(unknown)}")
        values.setdefault("name", f"{config.name}_custom")
        config = dataclasses.replace(config, **values)
    return build_model(config, contract=section.contract)


def configure_trainable(model: MedSAMModel, mode: str, lora=None, adapter=None) -> list[str]:
    """Freeze / unfreeze parameters (and add LoRA or Med-SA adapters) for ``mode``; return the
    trainable names."""
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "full":
        groups = [model.image_encoder, model.mask_decoder]
    elif mode == "decoder":
        groups = [model.mask_decoder]
    elif mode == "lora":
        if lora is None:
            raise ValueError("train.mode lora needs the lora settings")
        apply_lora(model.image_encoder, list(lora.targets), lora.rank, lora.alpha, lora.dropout)
        groups = [model.mask_decoder]
        if lora.train_neck and hasattr(model.image_encoder, "neck"):
            groups.append(model.image_encoder.neck)
        for name, p in model.image_encoder.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.requires_grad_(True)
    elif mode == "adapter":
        if not model.config.adapter:
            ratio, scale = (adapter.ratio, adapter.scale) if adapter is not None else (0.25, 0.5)
            add_medsa_adapters(model.image_encoder, ratio, scale)
            model.config = dataclasses.replace(model.config, adapter="medsa", adapter_ratio=ratio, adapter_scale=scale)
        groups = [model.mask_decoder]
        for p in adapter_parameters(model.image_encoder):
            p.requires_grad_(True)
    else:
        raise ValueError(f"unknown train.mode {mode!r}")
    for g in groups:
        for p in g.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def enable_gradient_checkpointing(model: MedSAMModel) -> int:
    """Recompute each encoder block in the backward pass; returns the number of blocks wrapped.

    The blocks' ``forward`` is wrapped on the instance, so parameter names do not change.
    """
    enc = model.image_encoder
    blocks = list(getattr(enc, "blocks", []))
    for layer in getattr(enc, "layers", []):  # TinyViT stages
        blocks.extend(getattr(layer, "blocks", []))
    for block in blocks:
        inner = block.forward

        def forward(self, *args, _inner=inner, **kwargs):
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = types.MethodType(forward, block)
    return len(blocks)


class SegmentationStep(nn.Module):
    """Images + prompts -> (B, 1, L, L) low-res logits and (B, 1) IoU predictions.

    Args of :meth:`forward` (network input frame): ``images`` (B, 3, S, S); ``boxes`` (B, 4) or
    None; ``points`` (B, P, 2) and ``point_labels`` (B, P) or None; ``mask_input`` (B, 1, L, L)
    and ``has_mask`` (B,) bool or None (samples without a mask prompt get the no-mask embedding);
    ``embeddings`` (B, C, E, E) instead of ``images`` when the encoder's outputs are precomputed.
    """

    def __init__(self, model: MedSAMModel, frozen_encoder: bool = False) -> None:
        super().__init__()
        self.model = model
        self.frozen_encoder = frozen_encoder
        self.train(model.training)

    def train(self, mode: bool = True) -> SegmentationStep:
        """A frozen encoder stays in eval mode: its BatchNorm statistics (LiteMedSAM's TinyViT)
        and dropout must not change while only the decoder trains."""
        super().train(mode)
        if self.frozen_encoder:
            self.model.image_encoder.eval()
        return self

    def forward(
        self,
        images=None,
        boxes=None,
        points=None,
        point_labels=None,
        mask_input=None,
        has_mask=None,
        embeddings=None,
    ):
        m = self.model
        if embeddings is not None:  # precomputed (decoder-only training with an embedding store)
            pass
        elif self.frozen_encoder:
            with torch.no_grad():
                embeddings = m.image_encoder(images)
        else:
            embeddings = m.image_encoder(images)
        pts = (points, point_labels) if points is not None else None
        sparse, dense = m.prompt_encoder(points=pts, boxes=boxes, masks=None)
        if mask_input is not None:
            with_mask = m.prompt_encoder.mask_downscaling(mask_input.to(dense.dtype))
            dense = torch.where(has_mask.view(-1, 1, 1, 1), with_mask, dense)
        logits, iou = m.mask_decoder(
            image_embeddings=embeddings,
            image_pe=m.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits, iou
