"""Typed request and response models of the workbench API (they make the OpenAPI schema).

Coordinates: ``x`` is the column and ``y`` the row of a slice, in pixels, as in
:class:`medsam.predictor.Predictor`; box corners are inclusive. A volume is ``(Z, Y, X)`` and
``slice_index`` is ``k`` (array axis 0); 2D images have one slice, index 0. Label maps travel as
:class:`RLEMask` (C-order runs; see :mod:`medsam.server.encoding`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .training_job import DEFAULT_LR, DEFAULT_STEPS, MAX_LR, MAX_STEPS

__all__ = [
    "XY",
    "Box",
    "Candidate",
    "EditProvenance",
    "EditRecord",
    "EmbeddingRequest",
    "EmbeddingStatus",
    "HeldoutScores",
    "ImageList",
    "ImageMeta",
    "ImageSummary",
    "JobInfo",
    "LabelDef",
    "LabelInfo",
    "LabelMap",
    "LabelMapWrite",
    "ModelEntry",
    "ModelList",
    "NextResponse",
    "ObjectScore",
    "Point",
    "PromptRecord",
    "PropagateRequest",
    "RLEMask",
    "RankedImage",
    "SegmentRequest",
    "SegmentResponse",
    "SelectModelRequest",
    "ServerInfo",
    "SliceLabelWrite",
    "SliceLabels",
    "Stroke",
    "TrainJobStatus",
    "TrainRequest",
    "UncertaintyRequest",
    "UploadResult",
]

LabelStatus = Literal["unlabelled", "labelled"]


class _Model(BaseModel):
    # NaN and infinities are refused in every field: JSON has no spelling for them, and a NaN
    # coordinate or learning rate is always a client error (422), never something to compute with.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Largest array side and run count a mask may name: far above any image, far below int64.
MAX_SIDE = 1 << 20
MAX_LABEL_VALUE = 65535


# ----------------------------------------------------------------------------- shared
class Box(_Model):
    """A box in slice pixels (x = column, y = row), corners inclusive: the object
    ``{"x0": .., "y0": .., "x1": .., "y1": ..}`` or the list ``[x0, y0, x1, y1]``."""

    x0: float
    y0: float
    x1: float
    y1: float

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            if len(data) != 4:
                raise ValueError(f"a box list needs 4 numbers [x0, y0, x1, y1], got {len(data)}")
            return dict(zip(("x0", "y0", "x1", "y1"), data))
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        as_list = {
            "type": "array",
            "items": {"type": "number"},
            "minItems": 4,
            "maxItems": 4,
            "description": "[x0, y0, x1, y1]",
        }
        if handler.mode == "validation":  # what a request may send; answers always use the object
            return {"anyOf": [schema, as_list], "description": schema.get("description")}
        return schema


class XY(_Model):
    """A position (x, y) in slice pixels."""

    x: float
    y: float


class Point(_Model):
    """A click at pixel (x, y); ``positive`` = inside the object, else background."""

    x: float
    y: float
    positive: bool = True


class Stroke(_Model):
    """A scribble: vertices in drawing order (slice pixels); ``positive`` = drawn inside the
    object, else over background. Given to the model as points along it (medsam.scribbles)."""

    points: list[XY] = Field(min_length=1, max_length=4096)
    positive: bool = True


class RLEMask(_Model):
    """A label array in C order as runs: ``values[i]`` repeated ``counts[i]`` times."""

    shape: list[Annotated[int, Field(ge=0, le=MAX_SIDE)]] = Field(
        min_length=1, max_length=4, description="array shape, e.g. [H, W] for a slice, [Z, Y, X] for a volume"
    )
    values: list[Annotated[int, Field(ge=0, le=MAX_LABEL_VALUE)]]
    counts: list[Annotated[int, Field(ge=0, le=1 << 62)]]


# ----------------------------------------------------------------------------- native 3D
class VoxelClickIn(_Model):
    """A click at voxel (i, j, k) of the file (``array[k, j, i]``)."""

    i: int = Field(ge=0, le=MAX_SIDE)
    j: int = Field(ge=0, le=MAX_SIDE)
    k: int = Field(ge=0, le=MAX_SIDE)
    positive: bool = True


class Segment3DRequest(_Model):
    """Clicks on one object of a volume, in the order given (SAM-Med3D decodes them one by one)."""

    image_id: str
    clicks: list[VoxelClickIn] = Field(min_length=1, max_length=64)
    sliding_window: bool = Field(default=False, description="follow an object larger than the crop")


class Segment3DResponse(_Model):
    image_id: str
    mask: RLEMask = Field(description="(Z, Y, X) 0/1 mask on the volume's grid")
    area: int = Field(description="mask voxels")
    crops: list[list[int]] = Field(description="first (i, j, k) of each cube decoded, on the model's RAS grid")
    encoder_calls: int = Field(description="cubes embedded for this volume so far (each once)")
    elapsed_ms: float


# ----------------------------------------------------------------------------- images
class ImageSummary(_Model):
    id: str = Field(description="path relative to the data folder, '/' separated")
    status: LabelStatus
    label_version: int


class ImageList(_Model):
    images: list[ImageSummary]
    count: int


class ImageMeta(_Model):
    id: str
    status: LabelStatus
    label_version: int
    shape: list[int] = Field(description="array shape: (Z, Y, X) for volumes, (H, W[, C]) for 2D")
    axes: str = Field(description="'ZYX', 'YX' or 'YXC': the meaning of each array axis")
    is_volume: bool
    is_color: bool
    n_slices: int = Field(description="slices along axis 0 (Z) for volumes, 1 for 2D images")
    slice_shape: list[int] = Field(description="(H, W) of one slice: rows (Y), columns (X)")
    spacing_xyz: list[float] = Field(description="voxel size in mm in ITK physical order (x, y[, z])")
    spacing_zyx: list[float] = Field(description="voxel size along each array axis, array order")
    origin: list[float] = Field(description="LPS position (mm) of voxel (0, 0[, 0]), (x, y[, z])")
    direction: list[list[float]] = Field(description="direction cosines; column d = index axis d (i, j, k)")
    dtype: str
    value_range: list[float]
    modality: str | None
    source_format: str | None
    window_presets: dict[str, list[float]] = Field(description="CT presets: name -> [level, width] (HU)")


class UploadResult(_Model):
    id: str


# ----------------------------------------------------------------------------- jobs
class JobInfo(_Model):
    """A background job (embedding warm-up, propagation, uncertainty scoring)."""

    id: str
    kind: Literal["embeddings", "propagate", "uncertainty", "auto"]
    image_id: str | None = None
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    error_status: int | None = Field(default=None, description="HTTP-like status of a failure (409 = conflict)")
    result: dict | None = Field(default=None, description="kind-specific summary, see the docs")
    created: str
    finished: str | None = None


# ----------------------------------------------------------------------------- embeddings
class EmbeddingRequest(_Model):
    slices: list[int] | None = Field(default=None, description="slices to embed; default all")


class EmbeddingStatus(_Model):
    image_id: str
    n_slices: int
    cached_slices: int = Field(description="slices whose embedding is in the on-disk cache")
    job: JobInfo | None = None


# ----------------------------------------------------------------------------- segment
class SegmentRequest(_Model):
    """Prompts on one slice. At least one of ``box``, ``points``, ``scribbles`` or ``previous``."""

    image_id: str
    slice_index: int = Field(default=0, ge=0)
    box: Box | None = None
    points: list[Point] = Field(default_factory=list, max_length=256)
    scribbles: list[Stroke] = Field(default_factory=list, max_length=64)
    previous: str | None = Field(default=None, description="logits_handle of an earlier answer on this slice")
    encoding: Literal["rle", "png", "both"] = "rle"
    zoom: bool = Field(default=True, description="segment a small box on a magnified crop around it (medsam.zoom)")
    candidates: bool = Field(default=False, description="also return the decoder's three multimask proposals")


class Candidate(_Model):
    """One of the decoder's alternative masks for the same prompts."""

    score: float = Field(description="the model's predicted IoU")
    area: int
    mask: RLEMask


class SegmentResponse(_Model):
    image_id: str
    slice_index: int
    score: float = Field(description="the model's predicted IoU")
    area: int = Field(description="mask pixels")
    bbox: Box | None = Field(description="bounding box of the mask (inclusive), None if empty")
    mask: RLEMask | None = None
    png_base64: str | None = Field(default=None, description="the 0/255 mask as a PNG, base64")
    logits_handle: str = Field(description="pass as 'previous' to refine this mask with more clicks")
    embedding_source: Literal["memory", "disk", "computed"]
    elapsed_ms: float
    zoom_window: Box | None = Field(
        default=None, description="the crop the box was segmented on (inclusive), if zoomed"
    )
    candidates: list[Candidate] = Field(default_factory=list)


# ----------------------------------------------------------------------------- labels
class LabelDef(_Model):
    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64)
    color: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")


class PromptRecord(_Model):
    box: Box | None = None
    points: list[Point] = Field(default_factory=list, max_length=256)
    scribbles: list[Stroke] = Field(default_factory=list, max_length=64)
    candidate: int | None = Field(
        default=None, ge=0, le=3, description="the proposal kept: 0 the model's mask, 1-3 its alternatives"
    )
    score: float | None = None
    label: int | None = None


class EditRecord(_Model):
    tool: Literal["brush", "eraser", "model", "clear"]
    label: int = Field(ge=0, le=255)
    pixels: int = Field(default=0, ge=0, description="pixels changed")
    radius: float | None = None


class EditProvenance(_Model):
    prompts: list[PromptRecord] = Field(default_factory=list, max_length=1000)
    edits: list[EditRecord] = Field(default_factory=list, max_length=10000)
    note: str | None = Field(default=None, max_length=2000)


class LabelInfo(_Model):
    image_id: str
    version: int = Field(description="0 = nothing saved yet; send it back as If-Match")
    exists: bool
    labels: list[LabelDef]
    file: str | None = Field(description="label file relative to the data folder")
    format: Literal["nifti", "png"]
    updated: str | None
    history_length: int
    model: dict | None = None


class SliceLabels(_Model):
    image_id: str
    slice_index: int
    version: int
    mask: RLEMask


class LabelMap(_Model):
    image_id: str
    version: int
    mask: RLEMask


class _LabelWrite(_Model):
    expected_version: int | None = Field(
        default=None, ge=0, description="alternative to the If-Match header: the version you read"
    )
    definitions: list[LabelDef] | None = Field(default=None, max_length=255)
    provenance: EditProvenance = Field(default_factory=EditProvenance)

    @field_validator("definitions")
    @classmethod
    def _unique_values(cls, v):
        if v is not None and len({d.value for d in v}) != len(v):
            raise ValueError("label values must be unique")
        return v


class SliceLabelWrite(_LabelWrite):
    """Replace the labels of one slice (``mask.shape`` = [H, W])."""

    mask: RLEMask


class LabelMapWrite(_LabelWrite):
    """Replace the whole label map (``mask.shape`` = the image's spatial shape)."""

    mask: RLEMask


# ----------------------------------------------------------------------------- propagate
class PropagateRequest(_Model):
    """Propagate label ``label`` from its mask on key slice ``slice_index`` (and on ``key_slices``)
    through the volume.

    Each key slice's mask (as last saved) gives its 2D box; :func:`medsam.volume.segment_volume`
    walks up and down from it (from several keys: :class:`medsam.volume.KeyBoxes`). Only slices
    where this label is absent are filled, unless ``replace`` is true; key slices and voxels of
    other labels are never overwritten.
    """

    image_id: str
    slice_index: int = Field(ge=0)
    label: int = Field(ge=1, le=255)
    expected_version: int = Field(ge=0)
    iou_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    box_margin: int = Field(default=3, ge=0, le=64)
    replace: bool = False
    key_slices: list[int] = Field(
        default_factory=list,
        max_length=4096,
        description="more key slices of this label (a corrected slice becomes one): each key's saved "
        "mask gives its box, each key walks the slices nearest to it (no IoU stop between keys), "
        "and no key slice is overwritten",
    )


class AutoRequest(_Model):
    """Every object of one slice, without prompts (:func:`medsam.automatic.generate_masks`).

    The job's result holds ``mask`` (RLE of an instance map: 1..N, 0 = none) and ``objects``
    (one record per instance: area, bbox, predicted_iou, stability_score, prompt, ...). Nothing is
    saved: the client shows the proposals and saves what it keeps through ``/labels``.
    """

    image_id: str
    slice_index: int = Field(default=0, ge=0)
    prompt: Literal["points", "boxes"] | None = Field(
        default=None, description="clicks (SAM models) or region boxes (MedSAM models); default: by the model"
    )
    points_per_side: int = Field(default=32, ge=1, le=64)
    pred_iou_thresh: float | None = Field(default=None, ge=0.0, le=1.0)
    stability_score_thresh: float | None = Field(default=None, ge=0.0, le=1.0)
    min_mask_region_area: int = Field(default=0, ge=0, le=10_000_000)


# ----------------------------------------------------------------------------- next
class UncertaintyRequest(_Model):
    image_ids: list[str] | None = Field(default=None, description="default: every unlabelled image")
    jitters: int = Field(default=8, ge=2, le=32)
    jitter_fraction: float = Field(default=0.1, gt=0.0, le=0.5)


class RankedImage(_Model):
    image_id: str
    status: LabelStatus
    uncertainty: float | None = Field(description="1 - agreement of the jittered masks; None = not scored yet")
    agreement: float | None = Field(description="mean IoU of the jittered-box masks with their consensus")
    predicted_iou: float | None = Field(description="the model's own IoU estimate for the central box")
    slice_index: int | None


class NextResponse(_Model):
    method: str
    images: list[RankedImage]
    scored: int
    unscored: int


class ServerInfo(_Model):
    name: str
    version: str
    model: dict
    token_required: bool
    max_upload_bytes: int
    upload_suffixes: list[str]
    encoder_calls: int
    cache_hits: int
    process_id: int = Field(description="the server process that answered (one of several with --workers)")
    model3d: dict | None = Field(default=None, description="the SAM-Med3D model of POST /segment3d, if any")


# ----------------------------------------------------------------------------- training
TrainMode = Literal["decoder", "lora"]


class TrainRequest(_Model):
    """Fine-tune the served model on the accepted labels (a background job; see the docs).

    ``decoder`` trains the mask decoder only (the image encoder and so every cached embedding
    stay as they are); ``lora`` adds LoRA adapters to the encoder's attention layers (merged into
    the weights afterwards). Full fine-tuning is not offered here: it does not fit a CPU.
    """

    mode: TrainMode = Field(default="decoder", description="'decoder' (default) or 'lora'")
    steps: int = Field(
        default=DEFAULT_STEPS, ge=1, le=MAX_STEPS, description="optimiser steps (batches of up to 4 objects)"
    )
    lr: float = Field(default=DEFAULT_LR, gt=0.0, le=MAX_LR, description="AdamW learning rate, cosine decay to 0")


class HeldoutScores(_Model):
    """Mean scores of one model over the held-out objects (box prompt = the label's bounding box)."""

    dsc: float = Field(description="mean Dice similarity coefficient over objects")
    nsd: float = Field(description="mean normalized surface Dice over objects")
    n_objects: int = Field(description="objects scored: one label on one held-out slice each")
    nsd_tolerance_mm: float


class ObjectScore(_Model):
    image_id: str
    slice_index: int
    label: int
    label_name: str
    dsc_before: float | None = None
    nsd_before: float | None = None
    dsc_after: float | None = None
    nsd_after: float | None = None


class TrainJobStatus(_Model):
    """A training job: state, progress, log tail, split, before/after scores, error."""

    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    phase: str = Field(
        description="queued, corpus, scoring before, training, exporting, scoring after, switching, finished"
    )
    mode: TrainMode
    steps: int
    lr: float
    step: int = Field(description="optimiser steps done")
    progress: float = Field(ge=0.0, le=1.0, description="overall progress of the job")
    loss: float | None = Field(description="training loss of the last step")
    log_tail: list[str] = Field(description="last lines of the job's log (the training process's output included)")
    train_images: list[str]
    heldout_images: list[str] = Field(description="images held out (never trained on) and scored")
    train_objects: int
    heldout_objects: int
    before: HeldoutScores | None = Field(description="the model served when the job started, on the held-out labels")
    after: HeldoutScores | None = Field(description="the new model, same objects, same prompts")
    objects: list[ObjectScore] = Field(description="per held-out object")
    model_before: str | None = Field(description="id of the model trained from")
    model_after: str | None = Field(description="id of the new model (set when done)")
    switched: bool = Field(description="whether the server now serves the new model")
    error: str | None = None
    error_status: int | None = Field(default=None, description="HTTP-like status of a failure (422 = the labels)")
    created: str
    finished: str | None = None
    elapsed_s: float


class ModelEntry(_Model):
    id: str = Field(description="'startup' (the model the server was started with) or a training job id")
    served: bool
    source: Literal["startup", "training"]
    name: str
    checkpoint: str | None = Field(description="weights file (relative to the data folder for trained models)")
    fingerprint: str | None = Field(description="SHA-256 of the weights (as in /info and label provenance)")
    created: str | None = None
    parent: str | None = Field(default=None, description="id of the model it was trained from")
    mode: TrainMode | None = None
    steps: int | None = None
    lr: float | None = None
    before: HeldoutScores | None = None
    after: HeldoutScores | None = None
    heldout_images: list[str] = Field(default_factory=list)


class ModelList(_Model):
    served: str = Field(description="id of the served model")
    training: bool = Field(description="a training job is queued or running (switching is refused meanwhile)")
    models: list[ModelEntry]


class SelectModelRequest(_Model):
    model_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
