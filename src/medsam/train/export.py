"""Training checkpoint -> inference checkpoint (safetensors + config and contract) for ``load_model``."""

from __future__ import annotations

from pathlib import Path

from ..model.registry import ModelConfig, build_model
from ..model.sam import MedSAMModel
from .checkpoint import load_checkpoint
from .lora import apply_lora, has_lora, merge_lora


def model_from_checkpoint(path: str | Path, merge: bool = True) -> tuple[MedSAMModel, dict]:
    """Rebuild the trained model of a training checkpoint (LoRA merged unless ``merge=False``).

    Returns (model in eval mode on the CPU, the checkpoint dict).
    """
    state = load_checkpoint(path)
    model = build_model(ModelConfig.from_dict(state["model_config"]), contract=state["contract"])
    weights = state["model"]
    if has_lora(weights):
        lora = state.get("lora") or {}
        apply_lora(
            model.image_encoder,
            list(lora.get("targets", ["attn.qkv", "attn.proj"])),
            int(lora.get("rank", 8)),
            float(lora.get("alpha", 16.0)),
        )
    model.load_state_dict(weights, strict=True)
    if merge:
        merge_lora(model)
    return model.eval(), state


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write ``output`` (``.safetensors`` + ``.json`` sidecar) from a training checkpoint.

    The file carries the architecture and the preprocessing contract, so
    ``medsam.load_model(output)`` rebuilds the model and the Predictor preprocesses as in training.
    """
    from ..weights import save_model

    model, state = model_from_checkpoint(checkpoint, merge=True)
    metrics = state.get("metrics") or {}
    extra = {
        "training": {
            "source": str(Path(checkpoint).name),
            "mode": state.get("mode"),
            "global_step": state.get("global_step"),
            "epoch": state.get("epoch"),
            "val_dsc": (metrics.get("all") or {}).get("dsc"),
            "val_nsd": (metrics.get("all") or {}).get("nsd"),
        }
    }
    return save_model(model, output, extra=extra)
