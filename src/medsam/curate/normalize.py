"""Intensity normalisation by modality, to uint8 [0, 255].

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

import numpy as np

__all__ = [
    "CT_WINDOWS",
    "KNOWN_MODALITIES",
    "normalize_image",
    "normalize_percentile",
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


def _as_finite_float(array) -> np.ndarray:
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
    out = (clipped - lo) * 255.0 / (hi - lo)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def window_ct(array, level: float, width: float) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and map that window to [0, 255] uint8."""
    if not np.isfinite(level) or not np.isfinite(width) or width <= 0:
        raise ValueError(f"CT window needs a finite level and a width > 0, got ({level}, {width})")
    arr = _as_finite_float(array)
    lo, hi = level - width / 2.0, level + width / 2.0
    return scale_to_uint8(np.clip(arr, lo, hi), lo, hi)


def normalize_percentile(array, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
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
    array,
    modality: str,
    window: str | Sequence[float] | None = None,
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
        CT only: a :data:`CT_WINDOWS` name or a ``(level, width)`` pair;
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
        if window is None:
            window = "soft_tissue"
        if isinstance(window, str):
            key = window.strip().lower().replace(" ", "_").replace("-", "_")
            if key not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {window!r}; known: {', '.join(CT_WINDOWS)}")
            level, width = CT_WINDOWS[key]
        else:
            try:
                level, width = (float(v) for v in window)
            except (TypeError, ValueError):
                raise ValueError(f"window must be a name or a (level, width) pair, got {window!r}") from None
        return window_ct(arr, level, width)
    if recipe == "color" and color:
        if arr.dtype == np.uint8:
            return np.array(arr, dtype=np.uint8, copy=True)
        return _minmax_per_channel(_as_finite_float(arr))
    return normalize_percentile(arr)
