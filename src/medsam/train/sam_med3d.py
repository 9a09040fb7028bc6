"""Fine-tuning SAM-Med3D on labelled volumes: ``medsam train`` with ``model.arch: sam_med3d``.

Each step takes one object of one volume (the case and label chosen by a generator keyed by
(seed, step), so a resumed run sees the samples the uninterrupted one would), prepared exactly
as inference prepares it (:mod:`medsam.native3d`: 1.5 mm, RAS, a cube around the object moved by
up to ``med3d.shift`` voxels, z-scored over voxels > 0), and trains the interaction SAM-Med3D
was trained for: ``med3d.clicks`` clicks, each placed at random in the error of the prediction
so far (positive where the object is missed, negative where it overflows) and decoded with the
earlier clicks and the previous low-resolution logits; the loss (squared Dice + BCE, the
released recipe, on logits upsampled to the cube) is averaged over the clicks.

``train.mode``: ``full`` trains every part, the image encoder at a tenth of ``train.lr``
(SAM-Med3D's recipe); ``decoder`` trains the prompt encoder and mask decoder on embeddings
computed without gradients. ``latest.pt`` (model, optimiser, step) is written every
``train.save_every`` steps and at the end, ``model.safetensors`` at the end; the learning rate
follows the 2D loop's warm-up and cosine schedule (``train.warmup_steps``, ``min_lr_ratio``): ``medsam.load_model``
and ``medsam segment --point I J K --checkpoint`` take it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..error_regions import random_error_point
from ..model.sam_med3d import SamMed3DConfig, SamMed3DModel
from .config import TrainConfig
from .labelled_volumes import find_pairs
from .result import TrainResult

KIND = "sam_med3d"


@dataclass
class LabelledVolume:
    """One case on the model's grid: ``image`` and ``labels`` (i, j, k) RAS-canonical at the
    model's spacing; ``values``: the label values trained on that it holds."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    values: list[int]


def load_volume(image_path: Path, label_path: Path, config: SamMed3DConfig, wanted: list[int] | None) -> LabelledVolume:
    """A labelled case resampled and reoriented as inference does (labels by nearest neighbour)."""
    from ..io import read_image
    from ..io._sitk import to_sitk
    from ..native3d import canonical_array, labels_on_grid, resample_isotropic

    image = read_image(image_path)
    labels = read_image(label_path)
    if not image.is_volume or labels.spatial_shape != image.spatial_shape:
        raise ValueError(f"{image_path.name}: not a volume with a label volume of the same shape")
    grid = resample_isotropic(to_sitk(image.array, image), config.spacing_mm)
    array, _ = canonical_array(grid)
    label_array, _ = canonical_array(labels_on_grid(to_sitk(labels.array.astype(np.int32), labels), grid))
    present = [int(v) for v in np.unique(label_array) if v > 0]
    values = [v for v in present if wanted is None or v in wanted]
    return LabelledVolume(image_path.name, array, label_array, values)


def sample_cube(
    case: LabelledVolume, value: int, size: int, shift: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised (S, S, S) cube around object ``value`` (moved by up to ``shift`` voxels)
    and its 0/1 target."""
    from ..native3d import crop_or_pad, cube_begin, zscore_foreground

    where = np.argwhere(case.labels == value)
    begin = cube_begin(where.min(axis=0), where.max(axis=0) + 1, size)
    if shift:
        begin = begin + rng.integers(-shift, shift + 1, size=3)
    cube = zscore_foreground(crop_or_pad(case.image, begin.tolist(), size))
    target = torch.from_numpy(crop_or_pad((case.labels == value).astype(np.uint8), begin.tolist(), size))
    return cube, target.float()


def interaction_loss(
    model: SamMed3DModel, embedding: torch.Tensor, target: torch.Tensor, clicks: int, rng: np.random.Generator
) -> torch.Tensor:
    """The mean over ``clicks`` simulated clicks of the loss of the prediction after each."""
    from .losses import bce_loss, dice_loss

    size = target.shape[-1]
    truth = target.numpy().astype(bool)
    prediction = np.zeros_like(truth)
    low = torch.zeros((1, 1, *(model.mask_input_size,) * 3), device=embedding.device)
    points: list[np.ndarray] = []
    labels: list[int] = []
    goal = target[None, None].to(embedding.device)
    total = embedding.new_zeros(())
    for _ in range(clicks):
        voxel, label = random_error_point(prediction, truth, rng)
        points.append(voxel)
        labels.append(label)
        coords = torch.as_tensor(np.stack(points), dtype=torch.float32, device=embedding.device)[None]
        point_labels = torch.as_tensor(labels, dtype=torch.int64, device=embedding.device)[None]
        out = model.decode(embedding, (coords, point_labels), mask_input=low.detach())
        low = out.logits
        logits = F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)
        total = total + (dice_loss(logits, goal, smooth=1e-5, squared=True) + bce_loss(logits, goal)).mean()
        prediction = (logits.detach() > 0)[0, 0].cpu().numpy()
    return total / clicks


def build_model(cfg: TrainConfig, device: torch.device) -> SamMed3DModel:
    """The model to fine-tune: ``model.checkpoint`` (a SAM-Med3D file or name), else a seeded
    random SAM-Med3D with ``model.config_overrides``."""
    from ..weights import load_model

    if cfg.model.checkpoint:
        if cfg.model.config_overrides:
            raise ValueError("model.config_overrides apply to a randomly initialised model, not a checkpoint")
        model = load_model(cfg.model.checkpoint, device=device)
        if not isinstance(model, SamMed3DModel):
            raise ValueError(f"model.checkpoint {cfg.model.checkpoint} is not a SAM-Med3D checkpoint")
        return model
    torch.manual_seed(cfg.train.seed)
    config = SamMed3DConfig.from_dict({**SamMed3DConfig().to_dict(), **cfg.model.config_overrides})
    return SamMed3DModel(config).to(device)


def _optimizer(model: SamMed3DModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    t = cfg.train
    groups = [{"params": list(model.prompt_encoder.parameters()) + list(model.mask_decoder.parameters()), "lr": t.lr}]
    if t.mode == "full":
        groups.append({"params": list(model.image_encoder.parameters()), "lr": t.lr * 0.1})
    else:
        model.image_encoder.requires_grad_(False)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))


def train_sam_med3d(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a SAM-Med3D fine-tuning as configured."""
    from .step_run import StepRun

    t = cfg.train
    run = StepRun(cfg, KIND)
    device = torch.device("cuda" if t.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    pairs = find_pairs(cfg.med3d.volumes or "")
    model = build_model(cfg, device).train()
    config = model.config
    cases = [load_volume(image, label, config, cfg.med3d.labels) for image, label in pairs]
    cases = [c for c in cases if c.values]
    if not cases:
        raise ValueError(f"{cfg.med3d.volumes}: no case holds an object to train on")
    optimizer = _optimizer(model, cfg)
    run.start(model, optimizer, t.max_steps or t.epochs * len(cases), len(cases), device=str(device))
    while run.step < run.steps:
        rng, case, value = run.draw(cases)
        cube, target = sample_cube(case, value, config.img_size, cfg.med3d.shift, rng)
        with torch.set_grad_enabled(t.mode == "full"):
            embedding = model.embed_image(cube.to(device)[None, None])
        loss = interaction_loss(model, embedding, target, cfg.med3d.clicks, rng)
        run.update(loss, list(model.parameters()), note=f"{case.name}, label {value}")
    return run.finish(model.eval(), extra={"trained_steps": run.step})
