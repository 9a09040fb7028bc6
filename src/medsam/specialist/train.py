"""Train the specialist U-Net on the corpus's training split of a group of datasets.

Recipe: MONAI ``UNet`` (2D, residual units, instance norm), ``DiceCELoss`` (softmax, one-hot
targets, Dice pooled over the batch, background included), AdamW with a cosine learning-rate
decay over the planned steps, random affine + gamma augmentation (no flips), one item per
training slice. Seeded: the network initialisation, the sample order and the augmentations come
from ``seed``, so a rerun on the same machine gives the same network.

Slices are brought to one in-plane orientation from each case's recorded geometry (``reorient``,
on by default: the corpus keeps each source file's voxel order, so a NIfTI case and a DICOM case
of one dataset can be mirrored) and either resized to ``size x size`` or, with ``pixel_mm``,
resampled to a fixed physical pixel size and padded/cropped to ``size x size``.

Model selection uses the validation split (never the training loss): after each epoch the
mean per-object DSC at the network resolution over the validation objects whose label is a
class of the network; ``unet.safetensors`` is the best epoch (``select="best"``, the default when
there are such objects) or the last one. ``last.safetensors`` is always the last epoch.

Run folder::

    RUN/unet.safetensors + unet.json     the selected network (what ``specialist-eval`` reads)
    RUN/last.safetensors + last.json     the network after the last epoch
    RUN/config.json                      the settings of the run
    RUN/train_log.csv                    epoch, steps, loss, val_dsc, lr, seconds
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..corpus import ManifestRow, group_by_slice, load_slice, read_manifest
from .data import (
    Augment,
    CaseOrientations,
    ClassSet,
    choose_classes,
    load_slices,
    prepare_image,
    prepare_label,
)
from .model import Specialist, build_unet, default_network, require_monai, save_specialist

log = logging.getLogger(__name__)


@dataclass
class SpecialistConfig:
    """Settings of a specialist run.

    Attributes:
        corpus: corpus folder. datasets: the dataset group (names in ``manifest.csv``).
        output: run folder. labels: the label ids to learn (default: every id of the training
            rows). epochs: passes over the training slices. size: network input size (pixels).
        pixel_mm: resample every slice to this many mm per pixel and pad/crop it to ``size``
            (default: resize every slice to ``size x size`` whatever its spacing).
        reorient: bring every case to the canonical in-plane orientation (``case.json``).
        time_limit: stop after the step that passes this many seconds (None: no limit).
        max_steps: stop after this many optimiser steps (None: epochs x steps per epoch).
        select: ``best`` (validation DSC) or ``last``.
    """

    corpus: str
    datasets: tuple[str, ...]
    output: str
    labels: tuple[int, ...] | None = None
    epochs: int = 40
    size: int = 256
    pixel_mm: float | None = None
    reorient: bool = True
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 2
    augment: bool = True
    seed: int = 0
    time_limit: float | None = None
    max_steps: int | None = None
    select: str = "best"
    device: str = "cpu"

    def validate(self) -> None:
        if not self.datasets:
            raise ValueError("choose at least one dataset (--datasets)")
        if self.size < 16 or self.size % (2 ** (len(self.channels) - 1)):
            raise ValueError(
                f"size {self.size} must be >= 16 and divisible by {2 ** (len(self.channels) - 1)} "
                f"(2 to the number of down-sampling steps)"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.pixel_mm is not None and not self.pixel_mm > 0:
            raise ValueError(f"pixel_mm must be > 0, got {self.pixel_mm}")
        if self.select not in ("best", "last"):
            raise ValueError(f"select must be 'best' or 'last', got {self.select!r}")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    classes: ClassSet
    epochs: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per optimiser step
    epoch_log: list[dict] = field(default_factory=list)
    best_val_dsc: float | None = None
    selected_epoch: int | None = None
    stopped_by: str = "epochs"


def _dataset_rows(cfg: SpecialistConfig) -> list[ManifestRow]:
    rows = read_manifest(cfg.corpus, datasets=cfg.datasets)
    found = {r.dataset for r in rows}
    missing = [d for d in cfg.datasets if d not in found]
    if missing:
        raise ValueError(f"datasets not in {cfg.corpus}/manifest.csv: {', '.join(missing)}")
    return rows


class _Validation:
    """Validation slices at the network size and the class index of each scorable object."""

    def __init__(
        self,
        corpus: str,
        rows: Sequence[ManifestRow],
        classes: ClassSet,
        size: int,
        pixel_mm: float | None,
        orientations: CaseOrientations,
    ) -> None:
        self.images = []
        self.targets = []
        self.objects: list[list[int]] = []
        index = {lab: k for k, lab in enumerate(classes.labels)}
        self.skipped = 0
        for group in group_by_slice(rows).values():
            ks = [index[r.label] for r in group if r.label in index]
            self.skipped += len(group) - len(ks)
            if not ks:
                continue
            image, label, spacing = load_slice(corpus, group[0])
            o = orientations(group[0])
            self.images.append(prepare_image(image, size, spacing, pixel_mm, o))
            self.targets.append(prepare_label(label, classes, size, spacing, pixel_mm, o)[0])
            self.objects.append(ks)

    def __len__(self) -> int:
        return sum(len(o) for o in self.objects)

    @torch.no_grad()
    def dsc(self, net: torch.nn.Module, device, batch: int = 8) -> float | None:
        if not self.objects:
            return None
        net.eval()
        scores = []
        for start in range(0, len(self.images), batch):
            x = torch.stack(self.images[start : start + batch]).to(device)
            pred = net(x).argmax(1).cpu()
            for j in range(pred.shape[0]):
                t = self.targets[start + j]
                for k in self.objects[start + j]:
                    p, g = pred[j] == k, t == k
                    n = int(p.sum()) + int(g.sum())
                    scores.append(1.0 if n == 0 else 2.0 * int((p & g).sum()) / n)
        return float(np.mean(scores))


def train_specialist(cfg: SpecialistConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train a specialist as set by ``cfg``; returns where it is and how training went."""
    require_monai()
    from monai.losses import DiceCELoss

    cfg.validate()
    say = progress or log.info
    t0 = time.monotonic()
    run_dir = Path(cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)

    rows = _dataset_rows(cfg)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"]
    if not train_rows:
        raise ValueError(f"no training rows for datasets {', '.join(cfg.datasets)}")
    classes = choose_classes(train_rows, cfg.labels)
    orientations = CaseOrientations(cfg.corpus, enabled=cfg.reorient)
    images, targets = load_slices(cfg.corpus, train_rows, classes, cfg.size, cfg.pixel_mm, orientations)
    val = _Validation(cfg.corpus, val_rows, classes, cfg.size, cfg.pixel_mm, orientations)
    say(
        f"{len(images)} training slices, {classes.num_classes - 1} structures + background, "
        f"{len(val)} validation objects ({val.skipped} of labels the network does not have)"
    )

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    network = default_network(cfg.channels, cfg.num_res_units)
    net = build_unet(network, classes.num_classes).to(device)
    info = {
        "datasets": list(cfg.datasets),
        "modalities": sorted({r.modality for r in train_rows}),
        "training": {"corpus": str(cfg.corpus), "train_slices": int(len(images)), "seed": cfg.seed},
    }
    model = Specialist(net, classes, cfg.size, network, info, pixel_mm=cfg.pixel_mm, reorient=cfg.reorient)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    planned = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        planned = min(planned, int(cfg.max_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, planned) / max(planned, 1)))
    )
    augment = Augment() if cfg.augment else None
    (run_dir / "config.json").write_text(
        json.dumps({**asdict(cfg), "classes": classes.to_dict(), "network": network}, indent=2) + "\n"
    )

    select_best = cfg.select == "best" and len(val) > 0
    losses: list[float] = []
    epoch_log: list[dict] = []
    best, best_epoch, step, stopped = None, None, 0, "epochs"
    t_train = time.monotonic()
    log_path = run_dir / "train_log.csv"
    with open(log_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "steps", "loss", "val_dsc", "lr", "seconds"])
        writer.writeheader()
        for epoch in range(cfg.epochs):
            net.train()
            perm = torch.randperm(len(images), generator=gen)
            epoch_losses = []
            for start in range(0, len(perm), cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                x, y = images[idx], targets[idx]
                if augment is not None:
                    x, y = augment(x, y, gen)
                x, y = x.to(device), y.to(device)
                loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(float(loss.detach()))
                epoch_losses.append(float(loss.detach()))
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                if cfg.time_limit is not None and time.monotonic() - t_train >= cfg.time_limit:
                    stopped = "time_limit"
                    break
            val_dsc = val.dsc(net, device)
            entry = {
                "epoch": epoch + 1,
                "steps": step,
                "loss": float(np.mean(epoch_losses)),
                "val_dsc": val_dsc,
                "lr": sched.get_last_lr()[0],
                "seconds": round(time.monotonic() - t0, 1),
            }
            epoch_log.append(entry)
            writer.writerow(entry)
            f.flush()
            vtxt = f", val DSC {val_dsc:.4f}" if val_dsc is not None else ""
            say(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['loss']:.4f}{vtxt} ({entry['seconds']:.0f} s)")
            model.info["training"].update({"epoch": epoch + 1, "steps": step, "val_dsc": val_dsc})
            if select_best and (best is None or val_dsc > best):
                best, best_epoch = val_dsc, epoch + 1
                save_specialist(model, run_dir / "unet.safetensors")
            if stopped != "epochs":
                break
    save_specialist(model, run_dir / "last.safetensors")
    if not select_best:
        save_specialist(model, run_dir / "unet.safetensors")
        best_epoch = len(epoch_log)
    seconds = time.monotonic() - t0
    say(f"done: {step} steps in {seconds:.0f} s; unet.safetensors = epoch {best_epoch}")
    return TrainResult(
        run_dir=run_dir,
        checkpoint=run_dir / "unet.safetensors",
        classes=classes,
        epochs=len(epoch_log),
        steps=step,
        seconds=seconds,
        losses=losses,
        epoch_log=epoch_log,
        best_val_dsc=best,
        selected_epoch=best_epoch,
        stopped_by=stopped,
    )
