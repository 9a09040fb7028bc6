"""Training MedSAM: corpus datasets, losses, LoRA, the (distributed, resumable) loop, export.

    from medsam.train import load_config, train, export_checkpoint
    cfg = load_config("configs/medsam_vit_b.yaml", ["data.corpus=/data/corpus", "output.dir=runs/a"])
    result = train(cfg)                      # under torchrun: one call per process
    export_checkpoint(result.run_dir / "best.pt", "medsam_finetuned.safetensors")

Modules: ``config`` (settings), ``data`` (dataset, sampler), ``losses``, ``lora``, ``trainable``
(modes), ``distributed``, ``checkpoint``, ``validate``, ``runlog``, ``loop``, ``export``,
``synthetic`` (a tiny corpus for tests). Names are imported lazily: ``import medsam.train`` does no work.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "medsam.train.config",
    "load_config": "medsam.train.config",
    "ConfigError": "medsam.train.config",
    "train": "medsam.train.loop",
    "Trainer": "medsam.train.loop",
    "TrainResult": "medsam.train.result",
    "export_checkpoint": "medsam.train.export",
    "model_from_checkpoint": "medsam.train.export",
    "SegmentationLoss": "medsam.train.losses",
    "SegmentationDataset": "medsam.train.data",
    "read_manifest": "medsam.corpus",
    "write_synthetic_corpus": "medsam.train.synthetic",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medsam.train' has no attribute {name!r}")
