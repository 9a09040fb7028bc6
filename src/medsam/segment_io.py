"""What every ``medsam segment`` path shares: its options, the model input, the model, the outputs.

:mod:`medsam.segment` (boxes) and :mod:`medsam.segment_auto` (automatic mode) both build on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .intensity import minmax_to_uint8, normalize_image
from .io import MedicalImage, write_mask
from .io.atomic import write_json

if TYPE_CHECKING:  # pragma: no cover
    from .automatic import AutoOptions
    from .model.sam import MedSAMModel
    from .model.sam2 import SAM2Model
    from .model.sam_med3d import SamMed3DModel
    from .zoom import ZoomPolicy

__all__ = [
    "SegmentOptions",
    "SegmentationOutput",
    "default_scores_path",
    "embedding_cache",
    "load_reporting",
    "model_description",
    "not_constant",
    "resolve_model",
    "to_model_input",
    "write_outputs",
]


@dataclass
class SegmentationOutput:
    """What :func:`segment_file` wrote and computed."""

    mask_path: Path
    scores_path: Path | None
    overlay_path: Path | None
    labels: np.ndarray
    scores: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SegmentOptions:
    """How :func:`segment_file` reads, prompts and writes (everything but the input, output and boxes).

    Attributes:
        model: a loaded model; default: ``checkpoint`` is loaded (the embedded model when None).
        checkpoint, arch, contract, device: as :func:`medsam.load_model` takes them.
        overlay_path: also write an overlay picture (PNG) here.
        scores_path: where the scores JSON goes (default: the output's stem + ``.scores.json``).
        key_slice: the slice 2D boxes on a volume are drawn on (array index ``k``).
        points: clicks ``(x, y, foreground)`` for one object (with at most one box), on
            ``key_slice`` of a volume or video.
        voxel_points: clicks ``(i, j, k, foreground)`` (voxel indices of the file) for one object
            of a volume, segmented natively in 3D by a SAM-Med3D model, in the order given;
            ``sliding_window`` follows the object past the model's crop
            (:func:`medsam.native3d.segment_clicks_3d`).
        modality, window: model-input normalisation (:func:`to_model_input`).
        series_uid: which DICOM series of a folder holding several.
        iou_threshold: volumes: stop propagation below this predicted IoU
            (:func:`medsam.volume.segment_volume`'s default when None).
        zoom: a :class:`medsam.zoom.ZoomPolicy`, ``None`` (never), or ``"auto"``: the default
            policy for 2D images and 2D ``.npz`` cases when the model's input is at most
            :data:`medsam.zoom.RECIPE_MAX_INPUT` px (LiteMedSAM's 64 x 64 embedding of a whole slice does not
            resolve small structures), no zoom otherwise and never in volumes (docs/model-card.md
            gives the measurements behind both choices).
        auto: automatic mode (:mod:`medsam.automatic`) with these options instead of boxes: every
            object of a 2D image; on a volume, every object of the key slice (``key_slice``,
            default the middle one), each then propagated through the volume as a 2D box.
        cache_dir: an on-disk embedding cache (:class:`medsam.embedding_cache.EmbeddingCache`) for
            whole slices: a rerun on the same image, model and contract (other prompts, a folder
            run resumed with new boxes) reads the embeddings instead of computing them.
        rtstruct_path: also write the label map as an RTSTRUCT referencing the input's DICOM
            series (:func:`medsam.io.rtstruct.write_rtstruct`); DICOM inputs only.
        proposals: with ``auto``, a label map on the input's grid (a file any reader here
            opens, or an array) whose connected pieces say where the objects are: in 2D each
            piece's box is refined by the model (:func:`medsam.automatic.refine_proposals`); in
            a volume each 3D piece's 3D box is segmented as ``Box3D`` prompts are.
        specialist: with ``auto`` on a 2D image, a specialist U-Net checkpoint
            (:func:`medsam.specialist.load_specialist`) whose prediction gives the proposals.
    """

    model: MedSAMModel | SAM2Model | SamMed3DModel | None = None
    checkpoint: str | Path | None = None
    arch: str | None = None
    contract: str | None = None
    device: str | None = None
    overlay_path: str | Path | None = None
    scores_path: str | Path | None = None
    key_slice: int | None = None
    points: tuple[tuple[float, float, bool], ...] = ()
    voxel_points: tuple[tuple[int, int, int, bool], ...] = ()
    sliding_window: bool = False
    modality: str | None = None
    window: str | tuple[float, float] | None = None
    series_uid: str | None = None
    iou_threshold: float | None = None
    zoom: ZoomPolicy | Literal["auto"] | None = "auto"
    auto: AutoOptions | None = None
    cache_dir: str | Path | None = None
    rtstruct_path: str | Path | None = None
    proposals: str | Path | np.ndarray | None = None
    specialist: str | Path | None = None

    def __post_init__(self) -> None:
        from .zoom import ZoomPolicy

        if not (self.zoom is None or self.zoom == "auto" or isinstance(self.zoom, ZoomPolicy)):
            raise ValueError(f"zoom must be a ZoomPolicy, None or 'auto', got {self.zoom!r}")


def to_model_input(
    image: MedicalImage, modality: str | None = None, window: str | tuple[float, float] | None = None
) -> np.ndarray:
    """The image array as the model should see it: uint8 after modality normalisation.

    uint8 data (PNG/JPEG, curated images) are kept. Otherwise the modality (``modality`` argument,
    else the DICOM tag) decides: CT is windowed (soft tissue unless ``window`` is given), other
    modalities are percentile-clipped; with no modality known, the array is min-max scaled.
    NaN and infinite voxels take the lowest finite value (with a warning); an image without any
    finite value is refused (ValueError).
    """
    array = _finite_or_refused(image.array)
    if array.dtype == np.uint8 and modality is None and window is None:
        return array
    chosen = modality or image.modality
    if chosen is None:
        if window is not None:
            chosen = "CT"
        else:
            return minmax_to_uint8(array)
    return normalize_image(array, chosen, window=window)


def _finite_or_refused(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "fc":
        return array
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise ValueError("the image has no finite value (every voxel is NaN or infinite)")
    bad = int(finite.size - np.count_nonzero(finite))
    warnings.warn(
        f"{bad} of {finite.size} voxels are NaN or infinite; they are given the lowest finite value", stacklevel=3
    )
    return np.where(finite, array, array[finite].min())


def not_constant(pixels: np.ndarray, image: MedicalImage) -> np.ndarray:
    """``pixels``, unless the whole model input is one grey value (nothing can be segmented:
    a blank image, or one whose every voxel was NaN; ITK's NIfTI reader gives NaN as 0)."""
    if pixels.size and pixels.min() == pixels.max():
        raw = np.asarray(image.array)
        value = float(raw.flat[0]) if raw.size else 0.0
        raise ValueError(f"the image is constant (every voxel is {value:g}): there is nothing to segment")
    return pixels


def embedding_cache(opts: SegmentOptions) -> Any:
    """The :class:`medsam.embedding_cache.EmbeddingCache` of ``opts.cache_dir``, or None."""
    if opts.cache_dir is None:
        return None
    from .embedding_cache import EmbeddingCache

    return EmbeddingCache(opts.cache_dir)


def resolve_any_model(opts: SegmentOptions, log: Callable[[str], None]) -> MedSAMModel | SAM2Model | SamMed3DModel:
    """``opts.model``, else the model of ``opts.checkpoint`` (any family)."""
    if opts.model is not None:
        return opts.model
    return load_reporting(opts.checkpoint, opts.device, opts.contract, log, arch=opts.arch)


def resolve_model(opts: SegmentOptions, log: Callable[[str], None]) -> MedSAMModel | SAM2Model:
    """The model of :func:`resolve_any_model`, refused if it is SAM-Med3D (which takes only
    voxel clicks on volumes)."""
    from .model.sam_med3d import SamMed3DModel

    model = resolve_any_model(opts, log)
    if isinstance(model, SamMed3DModel):
        raise ValueError(
            "a SAM-Med3D checkpoint segments volumes from voxel clicks (--point I J K); boxes, 2D "
            "clicks, videos and automatic mode need a SAM / MedSAM / SAM2-family model"
        )
    return model


def model_description(model: MedSAMModel | SAM2Model | SamMed3DModel, checkpoint: str | Path | None) -> dict[str, Any]:
    return {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "architecture": model.config.name,
        "untrained_default": bool(getattr(model, "is_untrained_default", False)),
    }


def load_reporting(
    checkpoint: str | Path | None,
    device: str | None,
    contract: str | None,
    log: Callable[[str], None],
    arch: str | None = None,
) -> MedSAMModel | SAM2Model | SamMed3DModel:
    """The model of ``checkpoint`` (the embedded default when None; load_model warns if that
    one is untrained)."""
    from .weights import load_model

    model = load_model(checkpoint, contract=contract, device=device, arch=arch)
    if checkpoint is None and not getattr(model, "is_untrained_default", False):
        log("using the embedded default model (no --checkpoint given)")
    return model


def write_outputs(
    image: MedicalImage,
    labels: np.ndarray,
    output_path: Path,
    overlay_path: str | Path | None,
    scores_path: str | Path | None,
    report: dict[str, Any],
    overlay_source: np.ndarray | None = None,
    overlay_boxes: np.ndarray | None = None,
    rtstruct_path: str | Path | None = None,
    names: dict[int, str] | None = None,
) -> tuple[Path, Path, Path | None]:
    """Write the mask (input geometry; a ``.dcm`` output of a DICOM input is a DICOM-SEG object
    referencing it), the scores JSON, the optional overlay PNG and the optional RTSTRUCT.
    ``names``: label -> segment / ROI name (default ``"object N"``)."""
    from .io.formats import format_of
    from .overlay import render_overlay, save_png
    from .preprocess import to_rgb_uint8

    dicom_seg = format_of(output_path) == "dicom"
    if rtstruct_path is not None or dicom_seg:  # only DICOM outputs name their objects
        present = [int(v) for v in np.unique(labels) if v > 0]
        if not present:
            raise ValueError("nothing was segmented: DICOM-SEG and RTSTRUCT outputs need at least one object")
        names = names or {v: f"object {v}" for v in present}

    picture = None
    if overlay_path is not None:
        assert overlay_source is not None  # given with every overlay_path
        picture = render_overlay(to_rgb_uint8(overlay_source), labels, overlay_boxes)
    scores_path = Path(scores_path) if scores_path else default_scores_path(output_path)
    structures = None
    if rtstruct_path is not None:  # made (and judged) before any file is written
        from .io.rtstruct import rtstruct_dataset

        structures = rtstruct_dataset(labels, image, names)
    if dicom_seg:
        from .io.dicom_seg import write_dicom_seg

        write_dicom_seg(labels, image, output_path, names)
    else:
        write_mask(labels, image, output_path)
    if structures is not None:
        from .io.rtstruct import save_rtstruct

        assert rtstruct_path is not None  # structures are made for an rtstruct_path only
        save_rtstruct(structures, rtstruct_path)
    write_json(scores_path, report, indent=2)
    if picture is not None:
        assert overlay_path is not None  # a picture is made for an overlay_path only
        save_png(picture, overlay_path)
    return output_path, scores_path, (Path(overlay_path) if overlay_path else None)


def default_scores_path(output_path: Path) -> Path:
    name = output_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff", ".npz", ".dcm"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output_path.with_name(name + ".scores.json")


def objects_report(result: Any, n_prompts: int, unit: str = "slices") -> list[dict[str, Any]]:
    """Per object of a :class:`medsam.volume.VolumeSegmentation`: its label, the range of
    ``unit`` (slices, or frames of a video) it was kept on, why each walk stopped, its scores."""
    return [
        {
            "label": i + 1 if n_prompts > 1 else 1,
            unit: None if r is None else list(r),
            "stopped": {"up": up, "down": down},
            "scores": {str(k): float(v) for k, v in sorted(sc.items())},
        }
        for i, (r, (up, down), sc) in enumerate(zip(result.slices, result.stop_reasons, result.scores))
    ]
