"""Every training setting, with its default, as dataclasses read from YAML.

A run is described by one YAML file with the sections below; any field can be overridden on the
command line as ``section.field=value`` (the value is parsed as YAML: ``train.lr=3e-4``,
``data.augment.flip=false``, ``lora.targets=[attn.qkv]``). Unknown sections or fields and values
of the wrong type are errors that name the offending key, never silently ignored.

    model:   what is trained: registry architecture, initial checkpoint, contract
    data:    the curated corpus, splits, prompts (box jitter, points, mask prompts), augmentation
    train:   mode (full / decoder / lora), steps, optimiser, schedule, precision, saving, resume
    loss:    focal + Dice (the paper) or Dice + BCE (the release), IoU-head MSE
    lora:    rank, alpha, dropout, target layers (train.mode = lora)
    adapter: Med-SA adapter width and scale (train.mode = adapter)
    distill: the teacher of an encoder distillation (train.mode = distill)
    med3d:   SAM-Med3D fine-tuning on labelled volumes (model.arch = sam_med3d)
    clips:   SAM2-family (MedSAM2) fine-tuning on labelled volumes as clips (clips.volumes)
    output:  run folder

The whole resolved config is stored in every checkpoint (as plain dicts), so a run can be resumed
or exported without the YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not parse or does not fit the schema."""


@dataclass
class ModelSection:
    """What is trained.

    Attributes:
        arch: registry name (``vit_b``, ``vit_l``, ``vit_h``, ``lite``, ``vit_tiny``). With no
            ``checkpoint`` the model is randomly initialised (seeded by ``train.seed``); with a
            checkpoint the architecture is read from the checkpoint and must match ``arch``
            (``null`` accepts whatever the checkpoint holds).
        checkpoint: initial weights, any format ``medsam.load_model`` reads (e.g. SAM's
            ``sam_vit_b_01ec64.pth`` for the MedSAM recipe, ``medsam_vit_b.pth`` to fine-tune).
        contract: preprocessing contract the model is trained (and later used) with:
            ``medsam``, ``sam`` or ``lite``; ``null`` = the checkpoint's, else the architecture's.
        config_overrides: fields of :class:`medsam.model.ModelConfig` changed from ``arch``'s
            (e.g. ``{depth: 2, img_size: 128}``), for small experimental models; random init only.
    """

    arch: str | None = "vit_b"
    checkpoint: str | None = None
    contract: str | None = None
    config_overrides: dict = field(default_factory=dict)


@dataclass
class AugmentSection:
    """Random augmentation of training samples (never applied to validation).

    Applied to the original image and mask before the contract's preprocessing, so the network
    sees exactly what the Predictor would produce for the augmented image.

    Attributes:
        flip_prob: probability of a horizontal flip and, independently, of a vertical flip.
        gamma: ``[lo, hi]`` range of a random gamma on intensities scaled to [0, 1]; ``null`` = off.
        contrast: ``[lo, hi]`` range of a random contrast factor around the mean; ``null`` = off.
        zoom_prob: probability of cropping a square around the object first (a magnified view,
            as :mod:`medsam.zoom` segments small objects at inference); 0 = off.
        zoom_context: ``[lo, hi]`` range of the crop side as a multiple of the object's longest
            box side.
        zoom_min_side: smallest crop side, original pixels.
        lesion_prob: probability of replacing the sample's object by a synthetic lesion pasted
            into its slice (:mod:`medsam.train.lesions`; grey-level slices only); 0 = off.
        lesion_kinds: the kinds drawn from (``tumour``, ``cyst``, ``nodule``, ``mass``).
        lesion_weights: relative frequencies of the kinds in training samples, e.g. ``{mass: 3}``
            (an unnamed kind weighs 1); ``{}`` = uniform. With ``cache_embeddings`` the store's
            copies are drawn uniformly (they do not change) and a sample picks among its slice's
            copies by their kinds' weights, so a kind is favoured as far as ``lesion_variants``
            copies hold it.
        lesion_variants: with ``cache_embeddings``: lesion copies per training slice in the
            store (each a fixed draw; a sample with a lesion picks one).
    """

    flip_prob: float = 0.0
    gamma: list | None = None
    contrast: list | None = None
    zoom_prob: float = 0.0
    zoom_context: list = field(default_factory=lambda: [2.0, 4.0])
    zoom_min_side: int = 32
    lesion_prob: float = 0.0
    lesion_kinds: list = field(default_factory=lambda: ["tumour", "cyst", "nodule"])
    lesion_weights: dict = field(default_factory=dict)
    lesion_variants: int = 2

    def lesion_weights_tuple(self) -> tuple[float, ...] | None:
        """``lesion_weights`` as one weight per ``lesion_kinds`` entry; None when uniform."""
        if not self.lesion_weights:
            return None
        return tuple(float(self.lesion_weights.get(k, 1.0)) for k in self.lesion_kinds)

    def lesion_views(self, copies: int, seed: int):
        """A :class:`medsam.train.embedding_store.LesionViews` of ``copies`` lesions per slice of
        ``lesion_kinds`` drawn from ``seed`` (the training store's and validation's lesions)."""
        from .embedding_store import LesionViews

        return LesionViews(int(copies), int(seed), tuple(str(k) for k in self.lesion_kinds))


@dataclass
class DataSection:
    """The curated corpus (``corpus.json``, ``manifest.csv``, ``cases/``) and the prompts.

    Attributes:
        corpus: folder of the corpus (required).
        train_split / val_split: values of the manifest's ``split`` column; ``val_split: null``
            turns validation (and so ``best.pt``) off.
        datasets / modalities: keep only rows of these datasets / modalities (empty = all).
        batch_size: samples per process (per GPU) per micro-step; the global batch is
            ``batch_size x world size x train.accumulation``.
        workers: DataLoader worker processes per rank (0 = load in the main process).
        jitter: box jitter: each side moved outwards by ``randint(0, jitter)`` pixels at the 1024
            scale (MedSAM: 20), i.e. ``round(jitter * S / 1024)`` pixels of an S-pixel input.
        jitter_mode: ``fixed`` (as above) or ``proportional``: each side moved outwards by
            ``randint(0, jitter_fraction x box side)`` pixels of the input.
        jitter_fraction: see ``jitter_mode``.
        points: positive points sampled inside the object given as prompts besides the box
            (0 = box only, MedSAM).
        negative_points: negative points sampled outside the object.
        box: give the box prompt (MedSAM: true). With ``box: false`` give ``points``.
        mask_prompt_prob: probability that a sample also gets a mask prompt (a perturbed
            ground-truth mask as low-resolution logits, ±``mask_prompt_logit``).
        mask_prompt_logit: magnitude of the mask-prompt logits.
        clicks: corrective clicks given with the box (0 = off): each sample draws this many,
            positive inside the object or negative inside its box but outside it; a step uses the
            first k of them for the whole batch, k = 0 with probability ``1 - click_prob`` and
            else uniform in 1..clicks.
        click_prob: probability that a step's batch gets clicks.
        click_source: ``random`` (each click drawn from the ground truth: positive inside the
            object, negative in its box outside it) or ``errors`` (each click where the model's
            own prediction from the box and the clicks so far is most wrong, as an annotator
            clicks: :func:`medsam.clicks.add_error_clicks`; k gradient-free decoder passes per
            step on embeddings computed once, the loss on the prediction with all k clicks) or
            ``scribbles`` (the same with each correction a stroke along the error region's medial
            axis, given as up to 4 points: :mod:`medsam.scribbles`).
        click_loss: on a step with k clicks, ``last`` takes the loss of the prediction from the
            box and all k clicks; ``every`` averages the losses of the k + 1 predictions from the
            box and the first 0, 1, ..., k clicks (SAM's interactive training supervises every
            round), so box-only prompts keep being trained on click steps too (k + 1 decoder
            passes with gradients).
        cache_embeddings: folder of precomputed image embeddings (only with ``train.mode:
            decoder``; built on first use, reused while encoder, corpus and zoom settings are
            unchanged; see :mod:`medsam.train.embedding_store`). Pixel augmentations (flips,
            gamma, contrast) cannot be cached and are refused with it; ``augment.zoom_prob`` then
            uses the inference crop of :mod:`medsam.zoom` at the middle of ``zoom_context``.
        val_max_samples: validate on at most this many objects (first rows of the split; 0 = all).
        val_lesions: also validate on this many synthetic lesions per grey-level validation slice
            (kinds ``augment.lesion_kinds``, drawn from ``train.seed`` and the slice's path, the
            same at every validation; each its own object, reported as modality ``<modality>
            lesion``); 0 = off.
        val_zoom: validate as :class:`medsam.Predictor` segments by default (the model's zoom
            recipe: small boxes on their crop for 256 px models, one extra embedding each)
            rather than on whole images.
        augment: see :class:`AugmentSection`.
    """

    corpus: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    datasets: list = field(default_factory=list)
    modalities: list = field(default_factory=list)
    batch_size: int = 8
    workers: int = 4
    jitter: float = 20.0
    jitter_mode: str = "fixed"
    jitter_fraction: float = 0.1
    points: int = 0
    negative_points: int = 0
    box: bool = True
    mask_prompt_prob: float = 0.0
    mask_prompt_logit: float = 8.0
    clicks: int = 0
    click_prob: float = 0.5
    click_source: str = "random"
    click_loss: str = "last"
    cache_embeddings: str | None = None
    val_max_samples: int = 0
    val_lesions: int = 0
    val_zoom: bool = False
    augment: AugmentSection = field(default_factory=AugmentSection)


@dataclass
class TrainSection:
    """The optimisation.

    Attributes:
        mode: ``full`` (image encoder + mask decoder, prompt encoder frozen: MedSAM),
            ``decoder`` (mask decoder only; embeddings computed without gradients), ``lora``
            (LoRA adapters on the encoder's attention + the mask decoder), ``adapter``
            (Med-SA adapters in every ViT block + the mask decoder) or ``distill`` (the image
            encoder learns a teacher's embeddings: :mod:`medsam.train.distill`).
        epochs: passes over the training split; ignored when ``max_steps`` > 0.
        max_steps: optimiser steps to run (0 = ``epochs`` full epochs).
        lr / weight_decay / betas: AdamW (MedSAM: 1e-4, 0.01).
        warmup_steps: linear warm-up from 0 to ``lr`` over this many optimiser steps, then cosine
            decay to ``lr x min_lr_ratio`` at the last step.
        accumulation: micro-batches accumulated into one optimiser step.
        grad_clip: clip the gradient norm to this value (0 = off).
        precision: ``fp32``, ``bf16`` (autocast, CPU or CUDA) or ``fp16`` (autocast + GradScaler,
            CUDA only).
        grad_checkpointing: recompute encoder blocks in the backward pass (less memory).
        seed: seeds model initialisation, data order and every random prompt/augmentation.
        deterministic: ask PyTorch for deterministic kernels (``torch.use_deterministic_algorithms``,
            warn-only) so that CUDA runs repeat exactly; slower. CPU runs are deterministic anyway.
        device: ``auto`` (the rank's GPU, else CPU), ``cpu`` or ``cuda``.
        save_every: write ``latest.pt`` every this many optimiser steps (0 = epoch ends only).
        val_every: validate every this many optimiser steps (0 = at epoch ends only).
        log_every: write a training row to metrics.csv every this many optimiser steps.
        resume: ``null`` (fresh run; refuses a run folder that already has ``latest.pt``),
            ``auto`` (continue from ``output.dir/latest.pt`` if present) or a checkpoint path.
        progress: show a tqdm progress bar on rank 0.
    """

    mode: str = "full"
    epochs: int = 1
    max_steps: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    accumulation: int = 1
    grad_clip: float = 0.0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    save_every: int = 0
    val_every: int = 0
    log_every: int = 10
    resume: str | None = None
    progress: bool = True


@dataclass
class LossSection:
    """The loss, computed on logits upsampled to the network input resolution.

    Attributes:
        kind: ``focal_dice`` (the paper and the seed: ``focal_weight`` x focal + ``dice_weight`` x
            Dice) or ``dice_bce`` (the released code: squared-denominator Dice + BCE,
            ``dice_weight`` and ``bce_weight``).
        focal_weight / dice_weight / bce_weight: weights of the terms (a term of ``kind`` that
            is not used is ignored).
        iou_weight: weight of the MSE between the predicted IoU and the IoU of the thresholded
            mask (trains the IoU head; 0 = off, as the release).
        focal_alpha / focal_gamma: focal loss parameters (SAM: 0.25, 2).
    """

    kind: str = "focal_dice"
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class LoraSection:
    """LoRA adapters (``train.mode: lora``).

    Attributes:
        rank / alpha / dropout: the adapter ``W + (alpha / rank) B A`` with ``A`` (rank x in),
            ``B`` (out x rank) initialised to zero, dropout on the adapter's input.
        targets: module-name suffixes inside ``image_encoder`` that get adapters (nn.Linear
            layers), e.g. ``attn.qkv`` and ``attn.proj`` of every block.
        train_neck: also train the encoder's neck (otherwise frozen with the encoder).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    train_neck: bool = False


@dataclass
class AdapterSection:
    """Med-SA adapters (``train.mode: adapter``; :mod:`medsam.model.adapters`).

    Attributes:
        ratio: bottleneck width as a fraction of the encoder width (Med-SA: 0.25).
        scale: weight of the MLP adapter's parallel branch (Med-SA: 0.5).
    """

    ratio: float = 0.25
    scale: float = 0.5


@dataclass
class DistillSection:
    """Encoder distillation (``train.mode: distill``; :mod:`medsam.train.distill`).

    Attributes:
        teacher: the teacher model: a checkpoint path, a model name (:mod:`medsam.hub`) or
            ``default`` (the embedded model). The student is ``model``.
        teacher_contract: the teacher's preprocessing contract (``null``: its own).
        cache: folder of the teacher's precomputed embeddings (``null``: ``output.dir/teacher_embeddings``).
    """

    teacher: str | None = None
    teacher_contract: str | None = None
    cache: str | None = None


@dataclass
class Med3DSection:
    """SAM-Med3D fine-tuning (``model.arch: sam_med3d``; :mod:`medsam.train.sam_med3d`).

    Attributes:
        volumes: folder of labelled volumes: ``images/`` (or ``imagesTr/``) and ``labels/`` (or
            ``labelsTr/``) with the same file names (an nnU-Net ``_0000`` channel suffix on the
            image is allowed).
        clicks: simulated clicks per sample, decoded one after another as at inference, each
            placed in the error of the prediction so far; the loss is averaged over them.
        shift: the crop is centred on the object's bounding box moved by up to this many
            voxels along each axis (0 = centred as at inference).
        labels: label values to train on (``null``: every value > 0 of each label file).
    """

    volumes: str | None = None
    clicks: int = 5
    shift: int = 16
    labels: list | None = None


@dataclass
class ClipsSection:
    """SAM2-family fine-tuning in MedSAM2's way (:mod:`medsam.train.sam2_clips`): set
    ``volumes`` with ``model.arch`` a SAM2-family name (``medsam2``, ``sam2.1_hiera_tiny`` ...)
    or ``null`` with a SAM2-family ``model.checkpoint``.

    Attributes:
        volumes: folder of labelled volumes, laid out as for ``med3d.volumes``.
        frames: slices per clip (SAM2's training uses 8).
        labels: label values to train on (``null``: every value > 0 of each label file).
        prompts: the kinds of prompt on a clip's first slice, one drawn at random per clip:
            ``box``, ``click`` (one positive click inside the object) and ``mask``.
        box_noise / box_noise_bound: each box corner moves by a normal draw with this fraction
            of the box's width (height) as standard deviation, bounded by this many pixels of
            the network input (SAM2's training: 0.1 and 20).
        correction_frames / correction_clicks: SAM2's simulated corrections. Up to
            ``correction_frames`` decoded slices of a clip (the number drawn from 1 to it: the first
            slice when its prompt is a box or a click, then random further ones) get
            ``correction_clicks`` clicks one after another, each at a random pixel of the error
            of the prediction so far (positive where the object is missed), decoded with the
            earlier clicks and the previous logits; 0 turns them off (SAM2's training: 2 and 7).
        object_weight: weight of the object-score loss (BCE on whether the object is on the slice).
        modality / window: how volumes become the model's 0-255 input, as ``medsam segment
            --modality / --window`` (``null``: the file's modality, else min-max).
    """

    volumes: str | None = None
    frames: int = 8
    labels: list | None = None
    prompts: list = field(default_factory=lambda: ["box", "click", "mask"])
    box_noise: float = 0.1
    box_noise_bound: float = 20.0
    correction_frames: int = 2
    correction_clicks: int = 7
    object_weight: float = 1.0
    modality: str | None = None
    window: str | None = None


@dataclass
class OutputSection:
    """Attributes:
    dir: run folder: ``latest.pt``, ``best.pt``, ``metrics.csv``, ``config.yaml``, TensorBoard
        events (``tb/``, when tensorboard is installed).
    tensorboard: write TensorBoard scalars when the package is importable.
    """

    dir: str = "runs/medsam"
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    lora: LoraSection = field(default_factory=LoraSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    distill: DistillSection = field(default_factory=DistillSection)
    med3d: Med3DSection = field(default_factory=Med3DSection)
    clips: ClipsSection = field(default_factory=ClipsSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        """Plain nested dicts of primitives (YAML- and ``torch.load(weights_only=True)``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> TrainConfig:
        cfg = _build(cls, data or {}, "")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check choices and ranges; raise :class:`ConfigError` naming the key."""
        _choice("train.mode", self.train.mode, ("full", "decoder", "lora", "adapter", "distill"))
        if self.train.mode == "distill" and not self.distill.teacher:
            raise ConfigError("train.mode distill needs distill.teacher (a checkpoint, a model name or 'default')")
        if not (0.0 < self.adapter.ratio <= 4.0 and self.adapter.scale >= 0.0):
            raise ConfigError("adapter.ratio must lie in (0, 4] and adapter.scale be >= 0")
        _choice("train.precision", self.train.precision, ("fp32", "bf16", "fp16"))
        _choice("loss.kind", self.loss.kind, ("focal_dice", "dice_bce"))
        _choice("data.jitter_mode", self.data.jitter_mode, ("fixed", "proportional"))
        if self.model.arch == "sam_med3d":
            _validate_med3d_section(self)
        elif trains_clips(self):
            _validate_clips_section(self)
        elif self.model.contract is not None:
            _choice("model.contract", self.model.contract, ("medsam", "sam", "lite"))
        if self.model.arch is None and self.model.checkpoint is None:
            raise ConfigError("give model.arch, model.checkpoint or both")
        for key, value, low in (
            ("data.batch_size", self.data.batch_size, 1),
            ("train.accumulation", self.train.accumulation, 1),
            ("train.log_every", self.train.log_every, 1),
            ("lora.rank", self.lora.rank, 1),
            ("data.workers", self.data.workers, 0),
            ("data.points", self.data.points, 0),
            ("data.negative_points", self.data.negative_points, 0),
            ("train.epochs", self.train.epochs, 0),
            ("train.max_steps", self.train.max_steps, 0),
            ("train.warmup_steps", self.train.warmup_steps, 0),
            ("train.save_every", self.train.save_every, 0),
            ("train.val_every", self.train.val_every, 0),
            ("data.jitter", self.data.jitter, 0),
            ("data.clicks", self.data.clicks, 0),
            ("data.augment.zoom_min_side", self.data.augment.zoom_min_side, 4),
            ("data.augment.lesion_variants", self.data.augment.lesion_variants, 1),
            ("data.val_lesions", self.data.val_lesions, 0),
        ):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        if self.train.epochs == 0 and self.train.max_steps == 0:
            raise ConfigError("set train.epochs or train.max_steps to a positive number")
        if not self.data.box and self.data.points + self.data.negative_points == 0:
            raise ConfigError("data.box is false and no points are asked for: give the model a prompt")
        if not 0.0 <= self.data.mask_prompt_prob <= 1.0:
            raise ConfigError("data.mask_prompt_prob must lie in [0, 1]")
        for key, value in (
            ("data.click_prob", self.data.click_prob),
            ("data.augment.zoom_prob", self.data.augment.zoom_prob),
            ("data.augment.lesion_prob", self.data.augment.lesion_prob),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} must lie in [0, 1], got {value}")
        if self.data.click_source not in ("random", "errors", "scribbles"):
            raise ConfigError(
                f"data.click_source must be 'random', 'errors' or 'scribbles', got {self.data.click_source!r}"
            )
        if self.data.click_loss not in ("last", "every"):
            raise ConfigError(f"data.click_loss must be 'last' or 'every', got {self.data.click_loss!r}")
        if self.data.click_source in ("errors", "scribbles") and (self.data.clicks == 0 or self.data.click_prob == 0):
            raise ConfigError(
                f"data.click_source={self.data.click_source} places data.clicks corrections: "
                "set data.clicks >= 1 and data.click_prob > 0"
            )
        if self.data.cache_embeddings:
            a = self.data.augment
            if self.train.mode != "decoder":
                raise ConfigError(
                    "data.cache_embeddings needs train.mode: decoder (a trained encoder changes its embeddings)"
                )
            if a.flip_prob > 0 or a.gamma is not None or a.contrast is not None:
                raise ConfigError(
                    "data.cache_embeddings cannot cache pixel augmentations: set data.augment.flip_prob=0, "
                    "data.augment.gamma=null and data.augment.contrast=null"
                )
        from .lesions import LESION_KINDS

        kinds = self.data.augment.lesion_kinds
        if not kinds or not set(kinds) <= set(LESION_KINDS):
            raise ConfigError(
                f"data.augment.lesion_kinds must be a non-empty list among {sorted(LESION_KINDS)}, got {kinds}"
            )
        weights = self.data.augment.lesion_weights
        for name, weight in weights.items():
            if name not in kinds:
                raise ConfigError(f"data.augment.lesion_weights names {name!r}, which is not in lesion_kinds {kinds}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
                raise ConfigError(f"data.augment.lesion_weights.{name} must be a number >= 0, got {weight!r}")
        if weights and not any(float(weights.get(k, 1.0)) > 0 for k in kinds):
            raise ConfigError("data.augment.lesion_weights gives every lesion kind weight 0")
        zc = self.data.augment.zoom_context
        if len(zc) != 2 or not 1.0 <= float(zc[0]) <= float(zc[1]):
            raise ConfigError(f"data.augment.zoom_context must be [lo, hi] with 1 <= lo <= hi, got {zc}")
        if not 0.0 <= self.data.augment.flip_prob <= 1.0:
            raise ConfigError("data.augment.flip_prob must lie in [0, 1]")
        for key in ("gamma", "contrast"):
            rng = getattr(self.data.augment, key)
            if rng is not None and (len(rng) != 2 or not 0 < float(rng[0]) <= float(rng[1])):
                raise ConfigError(f"data.augment.{key} must be [lo, hi] with 0 < lo <= hi, got {rng}")
        if len(self.train.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {self.train.betas}")


def _validate_med3d_section(cfg: TrainConfig) -> None:
    """The settings a SAM-Med3D run needs (model.arch: sam_med3d)."""
    _choice("train.mode", cfg.train.mode, ("full", "decoder"))
    if cfg.model.contract not in (None, "sam_med3d"):
        raise ConfigError(f"model.contract of SAM-Med3D is sam_med3d, got {cfg.model.contract!r}")
    if not cfg.med3d.volumes:
        raise ConfigError("model.arch: sam_med3d trains on med3d.volumes: give the folder of images/ and labels/")
    if cfg.med3d.clicks < 1 or cfg.med3d.shift < 0:
        raise ConfigError("med3d.clicks must be >= 1 and med3d.shift >= 0")


def is_sam2_arch(name: str | None) -> bool:
    """Whether ``name`` is a SAM2-family architecture (:data:`medsam.model.sam2.SAM2_CONFIGS`)."""
    return name == "medsam2" or str(name).startswith(("sam2_hiera_", "sam2.1_hiera_"))


def trains_clips(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` is a SAM2-family clip fine-tuning (:mod:`medsam.train.sam2_clips`)."""
    return bool(cfg.clips.volumes) or is_sam2_arch(cfg.model.arch)


def _validate_clips_section(cfg: TrainConfig) -> None:
    """The settings a SAM2-family clip run needs."""
    c = cfg.clips
    _choice("train.mode", cfg.train.mode, ("full", "decoder"))
    _choice("loss.kind", cfg.loss.kind, ("focal_dice",))
    if not c.volumes:
        raise ConfigError(
            f"model.arch: {cfg.model.arch} trains on clips.volumes: give the folder of images/ and labels/"
        )
    if cfg.model.arch is not None and not is_sam2_arch(cfg.model.arch):
        raise ConfigError(
            "clips.volumes trains a SAM2-family model: set model.arch to a SAM2-family name (medsam2, "
            "sam2.1_hiera_tiny, ...) or to null with a SAM2-family model.checkpoint"
        )
    if cfg.model.contract not in (None, "sam2", "medsam2"):
        raise ConfigError(f"model.contract of a SAM2-family model is sam2 or medsam2, got {cfg.model.contract!r}")
    if c.frames < 2:
        raise ConfigError(f"clips.frames must be >= 2, got {c.frames}")
    if not c.prompts or any(p not in ("box", "click", "mask") for p in c.prompts):
        raise ConfigError(f"clips.prompts must be a non-empty list of box, click and mask; got {c.prompts}")
    if c.box_noise < 0 or c.box_noise_bound < 0 or c.object_weight < 0:
        raise ConfigError("clips.box_noise, clips.box_noise_bound and clips.object_weight must be >= 0")
    if c.correction_frames < 0 or c.correction_clicks < 0:
        raise ConfigError("clips.correction_frames and clips.correction_clicks must be >= 0")
    if c.window is not None:
        from ..intensity import Window

        try:
            Window.parse(c.window)
        except ValueError as exc:
            raise ConfigError(f"clips.window: {exc}") from None


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"{prefix}{k}" for k in unknown)
            + f"; known in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - schema error
        raise TypeError(f"unsupported config type {tp} for {key}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key} must be a {name}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.field (e.g. train.lr)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b.c=value`` of ``overrides`` in the nested dict ``data`` (in place)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (``None`` = all defaults), apply ``section.field=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(data, list(overrides or []))
    return TrainConfig.from_dict(data)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
