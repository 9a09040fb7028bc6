"""A specialist baseline: a fully automatic 2D multi-class U-Net (MONAI) trained on the corpus.

The MedSAM paper compares the promptable foundation model with specialist U-Nets trained per task.
This package trains such a specialist on the same curated corpus and split as MedSAM (one network
for a group of datasets, one output channel per structure, no prompts) and scores it object by
object with the same rows as ``medsam benchmark``: (dataset, case, slice, label, label_name,
modality, dsc, nsd).

Needs MONAI (``pip install 'medsam[specialist]'``); importing this package does not import it,
building or loading a network does.

    from medsam.specialist import SpecialistConfig, train_specialist, evaluate_specialist
    run = train_specialist(SpecialistConfig(corpus="corpus", datasets=("totalseg_ct",), output="runs/unet"))
    result = evaluate_specialist("corpus", run.checkpoint, split="test", out_dir="runs/unet/test")
"""

from __future__ import annotations

from .data import (
    CaseOrientations,
    ClassSet,
    Orientation,
    choose_classes,
    logits_to_slice,
    orientation_from_geometry,
    prepare_image,
    prepare_label,
)
from .evaluate import OBJECT_COLUMNS, SUMMARY_COLUMNS, SpecialistEvaluation, evaluate_specialist, summarize_objects
from .model import Specialist, build_unet, load_specialist, require_monai, save_specialist
from .train import SpecialistConfig, TrainResult, train_specialist

__all__ = [
    "OBJECT_COLUMNS",
    "SUMMARY_COLUMNS",
    "CaseOrientations",
    "ClassSet",
    "Orientation",
    "Specialist",
    "SpecialistConfig",
    "SpecialistEvaluation",
    "TrainResult",
    "build_unet",
    "choose_classes",
    "evaluate_specialist",
    "load_specialist",
    "logits_to_slice",
    "orientation_from_geometry",
    "prepare_image",
    "prepare_label",
    "require_monai",
    "save_specialist",
    "summarize_objects",
    "train_specialist",
]
