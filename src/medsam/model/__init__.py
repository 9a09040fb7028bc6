"""The network: image encoders, prompt encoder, mask decoder and the registry of configurations."""

from .registry import CONFIGS, ModelConfig, build_model
from .sam import DecoderOutput, MedSAMModel

__all__ = ["CONFIGS", "DecoderOutput", "MedSAMModel", "ModelConfig", "build_model"]
