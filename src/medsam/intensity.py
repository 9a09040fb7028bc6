"""Intensity normalisation to uint8 [0, 255]: CT windows, modality recipes, min-max.

One home for every mapping from stored intensities to the grey values a model (or a display)
sees: curation, inference (CLI, library, workbench) and the workbench's slice pictures all
call this module.

MedSAM's recipes (Ma et al., Nat. Commun. 2024, ``pre_CT_MR.py``):

* CT: clip to a window ``[level - width/2, level + width/2]`` and rescale the
  window to [0, 255];
* MR, PET and other grey modalities: clip to the 0.5 / 99.5 percentiles of
  the foreground (voxels > 0), rescale to [0, 255], keep original zeros at 0;
* colour 2D images (endoscopy, fundus, dermoscopy, microscopy ...): kept in
  colour, rescaled per channel only when not already uint8.

Conversion to uint8 truncates (``np.uint8(x)`` of a float in [0, 255]) as
MedSAM does, so a value that maps to 127.9 becomes 127.

Differences from the release, on purpose: the CT window is rescaled with the
window bounds themselves, not the min/max of the clipped data (identical
whenever the image reaches both ends of the window, as nearly every CT does,
but the same HU always gives the same grey); degenerate inputs (empty
foreground, constant image) give defined output instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "CT_WINDOWS",
    "KNOWN_MODALITIES",
    "Window",
    "canonical_modality",
    "minmax_to_uint8",
    "normalize_image",
    "normalize_percentile",
    "scale_to_uint8",
    "window_ct",
]

# (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    # From MedSAM (pre_CT_MR.py and the paper's preprocessing section):
    "soft_tissue": (40, 400),
    "lung": (-600, 1500),
    "brain": (40, 80),
    # Conventional radiology presets, not in MedSAM:
    "bone": (400, 1800),
    "liver": (60, 160),
}


@dataclass(frozen=True)
class Window:
    """A CT display / model window: ``level`` (centre) and ``width``, in the image's units (HU).

    The window covers ``[level - width/2, level + width/2]``; :meth:`to_uint8` maps it linearly
    onto 0..255 and truncates, so the same HU always gives the same grey.
    """

    level: float
    width: float

    def __post_init__(self) -> None:
        level, width = float(self.level), float(self.width)
        if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
            raise ValueError(f"a window needs a finite level and a width > 0, got ({self.level}, {self.width})")
        lo, hi = level - width / 2.0, level + width / 2.0
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
            raise ValueError(f"window ({self.level}, {self.width}) is outside the floating-point range")
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "width", width)

    @property
    def lo(self) -> float:
        return self.level - self.width / 2.0

    @property
    def hi(self) -> float:
        return self.level + self.width / 2.0

    @classmethod
    def parse(cls, value: str | Sequence[float] | Window) -> Window:
        """A :data:`CT_WINDOWS` name (case, spaces and dashes ignored), a ``(level, width)`` pair,
        or a :class:`Window`. ValueError names what was wrong."""
        if isinstance(value, Window):
            return value
        if isinstance(value, str):
            key = preset_key(value)
            if key not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {value!r}; known: {', '.join(CT_WINDOWS)}")
            return cls(*CT_WINDOWS[key])
        try:
            level, width = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"a window must be a name or a (level, width) pair, got {value!r}") from None
        return cls(level, width)

    def to_uint8(self, array: ArrayLike, *, nonfinite: str = "raise") -> np.ndarray:
        """Clip to the window and map it to [0, 255] uint8 (truncating), any shape.

        ``nonfinite="raise"`` (the model input) refuses NaN / infinite values with a ValueError;
        ``"saturate"`` (a display) shows NaN as 0 and +-inf as 255 / 0.
        """
        if nonfinite == "saturate":
            data = np.asarray(array, dtype=np.float64)
            data = np.nan_to_num(data, nan=self.lo, posinf=self.hi, neginf=self.lo)
        elif nonfinite == "raise":
            data = _as_finite_float(array)
        else:
            raise ValueError(f"nonfinite must be 'raise' or 'saturate', got {nonfinite!r}")
        return scale_to_uint8(np.clip(data, self.lo, self.hi), self.lo, self.hi)


def preset_key(name: str) -> str:
    """The :data:`CT_WINDOWS` key a spelling such as ``"Soft tissue"`` or ``"soft-tissue"`` means."""
    return name.strip().lower().replace(" ", "_").replace("-", "_")


# canonical modality name -> recipe
RECIPES: dict[str, str] = {
    "CT": "window",
    "MR": "percentile",
    "PET": "percentile",
    "SPECT": "percentile",
    "US": "percentile",
    "XRay": "percentile",
    "Mammography": "percentile",
    "OCT": "percentile",
    "Endoscopy": "color",
    "Fundus": "color",
    "Dermoscopy": "color",
    "Microscopy": "color",
}
KNOWN_MODALITIES: tuple[str, ...] = tuple(RECIPES)

# accepted spellings (lower case) -> canonical name; includes DICOM Modality codes
_ALIASES: dict[str, str] = {m.lower(): m for m in RECIPES}
_ALIASES.update(
    {
        "mri": "MR",
        "pt": "PET",
        "nm": "SPECT",
        "ultrasound": "US",
        "x-ray": "XRay",
        "xr": "XRay",
        "cr": "XRay",
        "dx": "XRay",
        "mg": "Mammography",
        "es": "Endoscopy",
        "sm": "Microscopy",
    }
)


def canonical_modality(modality: str) -> str:
    if not isinstance(modality, str) or modality.strip().lower() not in _ALIASES:
        raise ValueError(
            f"unknown modality {modality!r}; known: {', '.join(KNOWN_MODALITIES)} "
            "(DICOM codes PT, NM, CR, DX, MG, ES, SM and 'MRI', 'X-ray' are accepted too)"
        )
    return _ALIASES[modality.strip().lower()]


def _as_finite_float(array: ArrayLike) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"expected a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.size and not np.all(np.isfinite(arr)):
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise ValueError(f"input has {n_nan} NaN and {n_inf} infinite values; fix or mask them before normalising")
    return arr


def scale_to_uint8(clipped: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``[0, 255]`` and truncate to uint8."""
    if hi <= lo:
        return np.where(clipped >= hi, 255, 0).astype(np.uint8)
    with np.errstate(over="ignore"):  # a window near the float range saturates
        out = (clipped - lo) * 255.0 / (hi - lo)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def window_ct(array: ArrayLike, level: float, width: float) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and map that window to [0, 255] uint8."""
    return Window(level, width).to_uint8(array)


def minmax_to_uint8(array: ArrayLike) -> np.ndarray:
    """Min-max scale a whole image or volume (all channels jointly) to uint8, rounding.

    Used where no modality is known. A constant input becomes zeros; bool becomes 0 / 255;
    uint8 is returned as it is. NaN or infinite values raise ValueError. Computed in float64
    one slab of the first axis at a time, so a volume needs no float64 copy of itself.
    """
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("image contains NaN or infinite values")
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.empty(arr.shape, dtype=np.uint8)
    slabs = arr if arr.ndim >= 3 else arr[None]
    target = out if arr.ndim >= 3 else out[None]
    for i in range(slabs.shape[0]):
        target[i] = np.round((slabs[i].astype(np.float64) - lo) * scale)
    return out


def normalize_percentile(array: ArrayLike, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """MedSAM's MR/PET recipe: foreground-percentile clip, min-max to [0, 255], zeros stay 0.

    The percentiles (``np.percentile``, linear interpolation) are taken over
    the voxels > 0. Voxels equal to 0 in the input are 0 in the output. An
    image without foreground gives all zeros; a constant foreground gives 255.
    """
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    arr = _as_finite_float(array)
    fg = arr[arr > 0]
    if fg.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(fg, [lower, upper])
    out = scale_to_uint8(np.clip(arr, lo, hi), float(lo), float(hi))
    out[arr == 0] = 0
    return out


def _minmax_per_channel(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=np.uint8)
    for c in range(arr.shape[-1]):
        ch = arr[..., c]
        lo, hi = float(ch.min()), float(ch.max())
        out[..., c] = 0 if hi <= lo else scale_to_uint8(ch, lo, hi)
    return out


def normalize_image(
    array: ArrayLike,
    modality: str,
    window: str | Sequence[float] | Window | None = None,
    *,
    color: bool | None = None,
) -> np.ndarray:
    """Normalise ``array`` to uint8 following the recipe for ``modality``.

    Parameters
    ----------
    array:
        ``(Z, Y, X)``, ``(H, W)`` or ``(H, W, C)`` (C = 3, or 4 with alpha,
        which is dropped).
    modality:
        One of :data:`KNOWN_MODALITIES` (case-insensitive; DICOM codes such as
        ``PT``, ``CR``, ``DX``, ``MG`` accepted).
    window:
        CT only: a :data:`CT_WINDOWS` name, a ``(level, width)`` pair or a :class:`Window`;
        default ``"soft_tissue"``.
    color:
        Whether the last axis holds colour channels. ``None`` (default): true
        for a 3D array whose last axis has 3 or 4 entries, except for CT
        (never colour).

    Recipes: CT -> :func:`window_ct`; colour modalities (endoscopy, fundus,
    dermoscopy, microscopy) -> colour kept, per-channel min-max unless the
    input is already uint8 (a grey input is percentile-normalised);
    every other modality -> :func:`normalize_percentile` (over all channels
    jointly for a colour input, so hues are kept).
    """
    name = canonical_modality(modality)
    recipe = RECIPES[name]
    if window is not None and recipe != "window":
        raise ValueError(f"window= only applies to CT, not to {name}")
    arr = np.asarray(array)
    if color is None:
        color = recipe != "window" and arr.ndim == 3 and arr.shape[-1] in (3, 4)
    if color:
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"a colour image must be (H, W, 3) or (H, W, 4), got {arr.shape}")
        arr = arr[..., :3]

    if recipe == "window":
        return Window.parse("soft_tissue" if window is None else window).to_uint8(arr)
    if recipe == "color" and color:
        if arr.dtype == np.uint8:
            return np.array(arr, dtype=np.uint8, copy=True)
        return _minmax_per_channel(_as_finite_float(arr))
    return normalize_percentile(arr)
