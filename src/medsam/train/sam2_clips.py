"""Fine-tuning a SAM2-family model (SAM2, SAM2.1, MedSAM2) on labelled volumes, as short clips.

``medsam train`` with ``clips.volumes`` (and ``model.arch`` a SAM2-family name, or ``null`` with
a SAM2-family ``model.checkpoint``). Each step takes one object of one volume (case, label,
start slice, direction and prompt drawn from a generator keyed by (seed, step), so a resumed
run sees the samples the uninterrupted one would) and trains memory tracking through a clip,
as SAM2's and MedSAM2's training do:

* a **clip** is ``clips.frames`` consecutive slices along the volume's first axis, starting at
  a slice that holds the object and running up or down (the object may leave the clip); each
  slice is prepared as inference prepares it (``to_model_input`` as ``medsam segment``, then
  the model's contract, :func:`medsam.preprocess.get_contract`), its target resized to the
  network input by nearest neighbour;
* the **first slice is prompted** (a box with SAM2's corner noise, one positive click, or the
  mask itself, ``clips.prompts``) and every further slice is tracked by
  :class:`~medsam.model.sam2_tracking.SAM2Tracker` (the same steps inference runs, holes not
  filled), attending to the memories and object pointers of the slices before it, with
  gradients through the memories (the whole clip is one graph);
* **corrections** (``clips.correction_frames`` / ``correction_clicks``, SAM2's simulated
  interaction): on up to that many decoded slices (the prompted first one among them when its
  prompt is a box or a click) clicks are added one after another, each at a random pixel of the
  error of the prediction so far, and the slice decoded again with the earlier clicks and the
  previous logits; the slice's memory and pointer come from its last decoding;
* the **loss** of each decoding (every correction included) is SAM2's: where the object is on the slice,
  ``loss.focal_weight`` x focal + ``loss.dice_weight`` x Dice on logits upsampled to the
  network input (of the candidate mask with the lowest such loss where the decoder proposed
  three) + ``loss.iou_weight`` x the L1 error of the predicted IoU of every candidate; on every
  slice ``clips.object_weight`` x BCE of the object score. Summed over the decodings of the
  clip's slices (a slice prompted by its mask has no decoding and no loss).

``train.mode``: ``full`` trains every parameter; ``decoder`` computes the image features
without gradients and trains the rest (prompt encoder, mask decoder except its projections of
the high-resolution maps, memory attention, memory encoder, object pointers). The bookkeeping
(resume, schedule, ``latest.pt``, ``model.safetensors``) is :class:`~.step_run.StepRun`'s.
Under torchrun every rank tracks its own clip and the gradients are averaged
(:class:`~.step_run.StepRun`): a step trains on as many clips as there are ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.sam2 import SAM2_CONFIGS, SAM2Config, SAM2Model
from ..model.sam2_tracking import Corrector, Decode, FrameFeatures, FrameOutput, HeadOutput, SAM2Tracker, frame_features
from .config import TrainConfig
from .distributed import DistInfo
from .result import TrainResult

KIND = "sam2_clips"


@dataclass
class ClipVolume:
    """One case: ``slices`` (Z, Y, X) or (Z, Y, X, 3) uint8 as the model sees them, ``labels``
    (Z, Y, X) integers, ``values``: the label values trained on that it holds."""

    name: str
    slices: np.ndarray
    labels: np.ndarray
    values: list[int]


@dataclass
class Clip:
    """A prepared clip: ``images`` (T, 3, S, S), ``targets`` (T, 1, S, S) 0/1 at the network
    input, and the first slice's prompt: ``kind`` ``box`` / ``click`` with ``coords`` (1, P, 2)
    in network-input pixels and ``point_labels`` (1, P), or ``mask`` (the first target)."""

    images: torch.Tensor
    targets: torch.Tensor
    kind: str
    coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None


@dataclass
class ClipLoss:
    """``total``: the clip's loss; ``terms``: each term summed over the clip (detached)."""

    total: torch.Tensor
    terms: dict[str, float]


def load_case(
    image_path: Path, label_path: Path, wanted: list[int] | None, modality: str | None, window: str | None
) -> ClipVolume:
    """A labelled volume with its slices as ``medsam segment`` would give them to the model."""
    from ..io import read_image
    from ..segment_io import to_model_input

    image = read_image(image_path)
    labels = read_image(label_path)
    if not image.is_volume or labels.spatial_shape != image.spatial_shape:
        raise ValueError(f"{image_path.name}: not a volume with a label volume of the same shape")
    label_array = np.asarray(labels.array).astype(np.int64)
    if label_array.shape[0] < 2:
        raise ValueError(f"{image_path.name}: one slice; a clip needs at least two")
    present = [int(v) for v in np.unique(label_array) if v > 0]
    values = [v for v in present if wanted is None or v in wanted]
    return ClipVolume(image_path.name, to_model_input(image, modality, window), label_array, values)


def clip_slices(case: ClipVolume, value: int, frames: int, rng: np.random.Generator) -> list[int]:
    """Up to ``frames`` consecutive slice indices from a random slice holding ``value``, in a
    random direction (fewer where the volume ends first; the other direction where the drawn
    one would leave the start slice alone, at the first or last slice)."""
    holding = np.flatnonzero((case.labels == value).any(axis=(1, 2)))
    start = int(holding[rng.integers(len(holding))])
    depth = case.labels.shape[0]
    up = list(range(start, min(start + frames, depth)))
    down = list(range(start, max(start - frames, -1), -1))
    chosen, other = (down, up) if rng.integers(2) else (up, down)
    return chosen if len(chosen) > 1 else other


def make_clip(
    case: ClipVolume,
    value: int,
    indices: list[int],
    model: SAM2Model,
    cfg: TrainConfig,
    rng: np.random.Generator,
    kind: str | None = None,
) -> Clip:
    """The prepared slices ``indices`` of ``case`` with object ``value`` and a prompt of ``kind``
    (``None``: drawn from ``clips.prompts``) on the first."""
    from ..preprocess import get_contract

    S = model.input_size
    contract = get_contract(model.contract, S)
    images = torch.cat([contract.prepare_image(case.slices[k])[0] for k in indices])
    masks = torch.from_numpy(np.stack([case.labels[k] == value for k in indices]).astype(np.float32))
    targets = F.interpolate(masks[:, None], size=(S, S), mode="nearest")
    c = cfg.clips
    kind = kind or str(c.prompts[int(rng.integers(len(c.prompts)))])
    if kind == "mask":
        return Clip(images, targets, kind)
    first = masks[0].numpy() > 0
    ys, xs = np.nonzero(first)
    geometry = contract.geometry(first.shape)
    if kind == "click":
        i = int(rng.integers(len(xs)))
        points, labels = np.array([[xs[i], ys[i]]], np.float64), np.array([1])
        coords = contract.transform_coords(points, geometry)
    else:
        corners = np.array([[xs.min(), ys.min()], [xs.max(), ys.max()]], np.float64)
        coords = contract.transform_coords(corners, geometry)
        side = coords[1] - coords[0]
        noise = rng.normal(size=(2, 2)) * c.box_noise * side
        coords = np.clip(coords + np.clip(noise, -c.box_noise_bound, c.box_noise_bound), 0, S - 1)
        labels = np.array([2, 3])
    return Clip(
        images,
        targets,
        kind,
        torch.as_tensor(coords[None], dtype=torch.float32),
        torch.as_tensor(labels[None], dtype=torch.int64),
    )


def error_clicks(target: torch.Tensor, clicks: int, rng: np.random.Generator) -> Corrector:
    """A :data:`~medsam.model.sam2_tracking.Corrector` of up to ``clicks`` clicks on a slice
    whose (1, 1, S, S) 0/1 ``target`` is at the network input: each at a random pixel of the error
    of the prediction so far (label 1 where the object is missed, 0 where the mask overflows it);
    it stops early once the prediction has no error."""
    from ..error_regions import random_error_point

    truth = target[0, 0].cpu().numpy() > 0.5
    S = truth.shape[-1]

    def correct(decode: Decode, heads: HeadOutput) -> list[HeadOutput]:
        steps: list[HeadOutput] = []
        points: list[list[float]] = []
        labels: list[int] = []
        current = heads
        for _ in range(clicks):
            upsampled = F.interpolate(current.low_res.detach(), size=(S, S), mode="bilinear", align_corners=False)
            prediction = upsampled[0, 0].cpu().numpy() > 0
            if np.array_equal(prediction, truth):
                break
            (y, x), label = random_error_point(prediction, truth, rng)
            points.append([float(x), float(y)])
            labels.append(label)
            device = current.low_res.device
            coords = torch.tensor([points], dtype=torch.float32, device=device)
            current = decode(coords, torch.tensor([labels], dtype=torch.int64, device=device), current)
            steps.append(current)
        return steps

    return correct


def plan_corrections(clip: Clip, cfg: TrainConfig, rng: np.random.Generator) -> dict[int, Corrector]:
    """The slices of ``clip`` that get corrections (``clips.correction_frames``), with their
    correctors: the number drawn from 1 to the setting, the first slice first when it is decoded
    (its prompt is not a mask), the rest drawn from the tracked slices."""
    c = cfg.clips
    if c.correction_frames == 0 or c.correction_clicks == 0:
        return {}
    count = int(rng.integers(1, c.correction_frames + 1))
    first = [0] if clip.kind != "mask" else []
    others = rng.permutation(np.arange(1, len(clip.images)))[: max(0, count - len(first))]
    return {t: error_clicks(clip.targets[t : t + 1], c.correction_clicks, rng) for t in [*first, *map(int, others)]}


def track_clip(
    model: SAM2Model, clip: Clip, train_encoder: bool, corrections: dict[int, Corrector] | None = None
) -> list[FrameOutput]:
    """The tracker's output on each slice of ``clip`` (the first from its prompt), with
    gradients where they are enabled (the image features only with ``train_encoder``);
    ``corrections``: slice -> its corrector (:func:`plan_corrections`)."""
    corrections = corrections or {}
    device = model.device
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        every = frame_features(model, clip.images.to(device))
    features = [
        FrameFeatures(every.pix[t : t + 1], every.pos[t : t + 1], tuple(m[t : t + 1] for m in every.high_res))
        for t in range(len(clip.images))
    ]
    tracker = SAM2Tracker(model, fill_hole_area=0)
    if clip.kind == "mask":
        track = tracker.prompt_mask(features[0], clip.targets[:1].to(device), key=0)
    else:
        assert clip.coords is not None and clip.point_labels is not None
        coords, labels = clip.coords.to(device), clip.point_labels.to(device)
        track = tracker.prompt(features[0], coords, labels, key=0, corrector=corrections.get(0))
    outputs = [track.key_output]
    for t in range(1, len(features)):
        outputs.append(tracker.step(track, t, features[t], len(features), corrector=corrections.get(t)))
    return outputs


def clip_loss(outputs: list[FrameOutput], targets: torch.Tensor, cfg: TrainConfig) -> ClipLoss:
    """SAM2's loss of a tracked clip (module docstring); ``targets`` (T, 1, S, S)."""
    from .losses import dice_loss, mask_iou, sigmoid_focal_loss

    w = cfg.loss
    total = targets.new_zeros((), device=outputs[0].pointer.device)
    sums = dict.fromkeys(("focal", "dice", "iou_l1", "object"), 0.0)
    decodings = [(heads, target) for out, target in zip(outputs, targets, strict=True) for heads in _decodings(out)]
    for heads, target in decodings:
        S = target.shape[-1]
        logits = F.interpolate(heads.masks, size=(S, S), mode="bilinear", align_corners=False)[0]  # (K, S, S)
        goal = target.to(logits.device).expand_as(logits)
        present = goal[0].any()
        objectness = F.binary_cross_entropy_with_logits(heads.object_logit.reshape(()), present.float())
        total = total + cfg.clips.object_weight * objectness
        sums["object"] += float(objectness.detach())
        if not present:
            continue
        focal = sigmoid_focal_loss(logits, goal, w.focal_alpha, w.focal_gamma)
        dice = dice_loss(logits, goal)
        best = int(torch.argmin(w.focal_weight * focal + w.dice_weight * dice))
        iou_l1 = (heads.ious[0].float() - mask_iou(logits, goal)).abs().mean()
        total = total + w.focal_weight * focal[best] + w.dice_weight * dice[best] + w.iou_weight * iou_l1
        sums["focal"] += float(focal[best].detach())
        sums["dice"] += float(dice[best].detach())
        sums["iou_l1"] += float(iou_l1.detach())
    return ClipLoss(total, sums)


def _decodings(out: FrameOutput) -> list[HeadOutput]:
    """A slice's decodings in order (none for a slice prompted by its mask: its output is the
    prompt)."""
    return [] if out.heads is None else [out.heads, *out.corrections]


def build_model(cfg: TrainConfig, device: torch.device) -> SAM2Model:
    """The model to fine-tune: ``model.checkpoint`` (a SAM2-family file or name), else a seeded
    random model of ``model.arch`` with ``model.config_overrides``."""
    from ..weights import load_model

    m = cfg.model
    if m.checkpoint:
        if m.config_overrides:
            raise ValueError("model.config_overrides apply to a randomly initialised model, not a checkpoint")
        model = load_model(m.checkpoint, contract=m.contract, arch=m.arch, device=device)
        if not isinstance(model, SAM2Model):
            raise ValueError(
                f"model.checkpoint {m.checkpoint} holds a {model.config.name} model, not a SAM2-family one"
            )
        return model
    if m.arch not in SAM2_CONFIGS:
        raise ValueError(f"unknown SAM2-family model.arch {m.arch!r}; known: {sorted(SAM2_CONFIGS)}")
    torch.manual_seed(cfg.train.seed)
    config = SAM2Config.from_dict({**SAM2_CONFIGS[m.arch].to_dict(), **m.config_overrides})
    return SAM2Model(config, contract=m.contract).to(device)


def trainable_parameters(model: SAM2Model, mode: str) -> list[torch.nn.Parameter]:
    """Every parameter (``full``), or all but the image features' (``decoder``: the image
    encoder and the decoder's high-resolution projections), which are frozen."""
    if mode == "decoder":
        decoder = model.sam_mask_decoder
        for part in (model.image_encoder, decoder.conv_s0, decoder.conv_s1):
            part.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def train_sam2_clips(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a SAM2-family clip fine-tuning as configured."""
    from .distributed import cleanup, init_distributed

    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    from .labelled_volumes import find_pairs
    from .step_run import StepRun

    t, c = cfg.train, cfg.clips
    run = StepRun(cfg, KIND, info)
    device = info.device
    pairs = find_pairs(c.volumes or "")
    model = build_model(cfg, device).train()
    cases = [load_case(image, label, c.labels, c.modality, c.window) for image, label in pairs]
    cases = [case for case in cases if case.values]
    if not cases:
        raise ValueError(f"{c.volumes}: no case holds an object to train on")
    parameters = trainable_parameters(model, t.mode)
    optimizer = torch.optim.AdamW(parameters, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
    run.start(model, optimizer, t.max_steps or t.epochs * len(cases), len(cases), device=str(device))
    while run.step < run.steps:
        rng, case, value = run.draw(cases)
        clip = make_clip(case, value, clip_slices(case, value, c.frames, rng), model, cfg, rng)
        outputs = track_clip(model, clip, t.mode == "full", plan_corrections(clip, cfg, rng))
        loss = clip_loss(outputs, clip.targets, cfg)
        run.update(loss.total, parameters, note=f"{case.name}, label {value}, {clip.kind} prompt")
    return run.finish(model.eval(), extra={"trained_steps": run.step})
