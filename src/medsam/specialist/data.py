"""Inputs and targets of the specialist U-Net, from the curated corpus.

A training item is one slice (not one object): the uint8 image brought to the canonical in-plane
orientation of the case (:class:`Orientation`, from ``case.json``), resized (bilinear,
antialiased when shrinking; colour images averaged to grey) to ``size x size`` or, with
``pixel_mm``, to a fixed physical pixel size and then padded/cropped to ``size x size``, and
min-max scaled to [0, 1] per slice; the target is the slice's label map with every label id
replaced by its class index (ids outside the class set become background 0), framed the same
way with nearest-neighbour resizing. :func:`logits_to_slice` maps the network's output back.

The class set is chosen once, at training time, and stored in the checkpoint: class 0 is
background and class ``k`` is the label id ``labels[k]``. By default it is the union of the label
ids present in the training rows of the chosen datasets (a structure the network never sees in
training cannot be learnt; such test objects score 0 at evaluation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..corpus import ManifestRow, group_by_slice, load_slice


@dataclass(frozen=True)
class ClassSet:
    """The network's output channels: ``labels[k]`` is the corpus label id of channel ``k``.

    ``labels[0]`` is 0 (background); ``names[k]`` the structure name.
    """

    labels: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.labels or self.labels[0] != 0:
            raise ValueError("a class set starts with the background label 0")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate label ids in the class set: {self.labels}")
        if len(self.names) != len(self.labels):
            raise ValueError("one name per class is needed")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def lookup(self, max_label: int) -> np.ndarray:
        """Array mapping a label id (0..max_label) to its class index (0 when not in the set)."""
        lut = np.zeros(max(int(max_label), max(self.labels)) + 1, dtype=np.int64)
        for k, lab in enumerate(self.labels):
            lut[lab] = k
        return lut

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> ClassSet:
        return cls(tuple(int(v) for v in d["labels"]), tuple(str(v) for v in d["names"]))


def choose_classes(rows: Sequence[ManifestRow], labels: Sequence[int] | None = None) -> ClassSet:
    """The class set of ``rows`` (usually the training rows of the chosen datasets).

    Args:
        rows: manifest rows; their label ids and names are collected.
        labels: if given, exactly these ids (in this order; 0 is dropped and put first); an id
            absent from ``rows`` is an error (it could not be learnt).
    """
    names: dict[int, str] = {}
    for r in rows:
        names.setdefault(int(r.label), r.label_name)
    if not names:
        raise ValueError("no objects to choose classes from (no training rows for these datasets?)")
    if labels is None:
        chosen = sorted(names)
    else:
        chosen = [int(v) for v in labels if int(v) != 0]
        missing = [v for v in chosen if v not in names]
        if missing:
            raise ValueError(f"label ids not present in the training rows: {missing}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"duplicate label ids: {chosen}")
    return ClassSet((0, *chosen), ("background", *(names[v] for v in chosen)))


# ---------------------------------------------------------------------------- orientation
@dataclass(frozen=True)
class Orientation:
    """How a stored slice is turned into the canonical in-plane orientation (and back).

    The corpus stores slices in the voxel order of their source file, so two cases of one
    dataset may be mirrored (a NIfTI in RAS order against a DICOM series in LPS order). A
    specialist, unlike a prompted model, learns where structures are, so the slices are brought
    to one orientation from the case's recorded geometry: the in-plane axes ordered so that rows
    follow the physical axis of higher index (axial slices: rows = y, columns = x), then flipped
    so that rows and columns run towards +x (patient left), +y (posterior) and -z (superior at
    the top). For axial slices that is the radiological display
    (anterior at the top, the patient's right on the image's left).

    ``forward`` is applied first (transpose, then flips); ``inverse`` undoes it.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def forward(self, a: np.ndarray) -> np.ndarray:
        """(H, W[, C]) array in stored order -> canonical order (a view)."""
        if self.transpose:
            a = a.swapaxes(0, 1)
        if self.flip_rows:
            a = a[::-1]
        if self.flip_cols:
            a = a[:, ::-1]
        return a

    def forward_spacing(self, spacing: Sequence[float]) -> tuple[float, float]:
        sr, sc = (float(v) for v in spacing)
        return (sc, sr) if self.transpose else (sr, sc)

    def inverse_torch(self, t: torch.Tensor) -> torch.Tensor:
        """(..., H, W) tensor in canonical order -> stored order."""
        dims = [d for d, f in ((-2, self.flip_rows), (-1, self.flip_cols)) if f]
        if dims:
            t = torch.flip(t, dims)
        if self.transpose:
            t = t.transpose(-2, -1)
        return t

    def to_dict(self) -> dict:
        return {"transpose": self.transpose, "flip_rows": self.flip_rows, "flip_cols": self.flip_cols}


_DESIRED_SIGN = {0: 1.0, 1: 1.0, 2: -1.0}  # +x (left), +y (posterior), -z (superior first)


def orientation_from_geometry(geometry: dict, slice_axis: int = 0) -> Orientation:
    """The :class:`Orientation` of a case's slices from its ``case.json`` ``geometry``.

    ``geometry["direction"]`` is the image's direction matrix (LPS, columns = index axes
    i, j, k = x, y, z); arrays are (Z, Y, X) (2D: (Y, X)) and a slice drops ``slice_axis``.
    Anything missing or odd gives the identity.
    """
    try:
        d = np.asarray(geometry.get("direction"), dtype=np.float64)
    except (TypeError, ValueError):
        return Orientation()
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] not in (2, 3) or not np.all(np.isfinite(d)):
        return Orientation()
    n = d.shape[0]
    in_plane = [a for a in range(n) if n == 2 or a != int(slice_axis)]
    if len(in_plane) != 2:
        return Orientation()
    cols = [d[:, n - 1 - a] for a in in_plane]  # array axis a <-> index axis n - 1 - a
    phys = [int(np.argmax(np.abs(c))) for c in cols]
    signs = [float(np.sign(c[p])) or 1.0 for c, p in zip(cols, phys)]
    transpose = phys[0] < phys[1]
    if transpose:
        phys, signs = phys[::-1], signs[::-1]
    return Orientation(
        transpose=transpose,
        flip_rows=signs[0] != _DESIRED_SIGN.get(phys[0], 1.0),
        flip_cols=signs[1] != _DESIRED_SIGN.get(phys[1], 1.0),
    )


class CaseOrientations:
    """Orientation of each row's case, read once from ``CORPUS/cases/<dataset>/<case>/case.json``.

    A case without ``case.json`` (or with ``enabled=False``) gets the identity.
    """

    def __init__(self, corpus: str | Path, enabled: bool = True) -> None:
        self.corpus = Path(corpus)
        self.enabled = enabled
        self._cache: dict[tuple[str, str], Orientation] = {}

    def __call__(self, row: ManifestRow) -> Orientation:
        if not self.enabled:
            return Orientation()
        key = (row.dataset, row.case)
        if key not in self._cache:
            path = self.corpus / "cases" / row.dataset / row.case / "case.json"
            orientation = Orientation()
            if path.is_file():
                try:
                    info = json.loads(path.read_text())
                    orientation = orientation_from_geometry(info.get("geometry") or {}, int(info.get("slice_axis", 0)))
                except (OSError, ValueError, TypeError):
                    orientation = Orientation()
            self._cache[key] = orientation
        return self._cache[key]


# ---------------------------------------------------------------------------- input frame
def _to_grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        return image.astype(np.float32).mean(axis=2)
    if image.ndim != 2:
        raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {image.shape}")
    return image.astype(np.float32)


def resized_shape(
    shape: Sequence[int], size: int, spacing: Sequence[float] | None = None, pixel_mm: float | None = None
) -> tuple[int, int]:
    """(h, w) of the resized slice: ``size x size``, or the slice at ``pixel_mm`` mm per pixel."""
    if pixel_mm is None:
        return int(size), int(size)
    if spacing is None:
        raise ValueError("a fixed pixel size (pixel_mm) needs the slice spacing")
    h, w = int(shape[0]), int(shape[1])
    return max(1, int(round(h * float(spacing[0]) / pixel_mm))), max(1, int(round(w * float(spacing[1]) / pixel_mm)))


def _offsets(n: int, size: int) -> tuple[int, int]:
    """(pad before, crop start) to centre a length ``n`` in ``size``."""
    return (max(0, (size - n) // 2), max(0, (n - size) // 2))


def pad_crop(t: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """(..., h, w) -> (..., size, size): centred zero padding or centred crop, per axis."""
    h, w = t.shape[-2:]
    (ph, ch), (pw, cw) = _offsets(h, size), _offsets(w, size)
    t = t[..., ch : ch + min(h, size), cw : cw + min(w, size)]
    if ph or pw or t.shape[-2] < size or t.shape[-1] < size:
        t = F.pad(t, (pw, size - t.shape[-1] - pw, ph, size - t.shape[-2] - ph), value=fill)
    return t


def unpad_crop_logits(logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pad_crop` for (C, size, size) logits -> (C, h, w); cropped-away parts are background."""
    c, size = logits.shape[0], logits.shape[-1]
    (ph, ch), (pw, cw) = _offsets(h, size), _offsets(w, size)
    out = torch.zeros(c, h, w, dtype=logits.dtype, device=logits.device)
    out[0] = 1.0
    out[:, ch : ch + min(h, size), cw : cw + min(w, size)] = logits[:, ph : ph + min(h, size), pw : pw + min(w, size)]
    return out


def prepare_image(
    image: np.ndarray,
    size: int,
    spacing: Sequence[float] | None = None,
    pixel_mm: float | None = None,
    orientation: Orientation | None = None,
) -> torch.Tensor:
    """(H, W[, 3]) uint8 slice -> (1, size, size) float32 in [0, 1].

    Canonical orientation (if given), grey, bilinear (antialiased) resize to ``size x size`` or,
    with ``pixel_mm``, to ``pixel_mm`` mm per pixel followed by a centred pad (0) or crop; min-max
    to [0, 1] per slice before the padding.
    """
    if orientation is not None:
        image = orientation.forward(image)
        spacing = orientation.forward_spacing(spacing) if spacing is not None else None
    h, w = resized_shape(image.shape[:2], size, spacing, pixel_mm)
    x = torch.from_numpy(np.ascontiguousarray(_to_grey(image)))[None, None]
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    lo, hi = x.amin(), x.amax()
    x = (x - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(x)
    if (h, w) != (size, size):
        x = pad_crop(x, size)
    return x[0].contiguous()


def prepare_label(
    label: np.ndarray,
    classes: ClassSet,
    size: int,
    spacing: Sequence[float] | None = None,
    pixel_mm: float | None = None,
    orientation: Orientation | None = None,
) -> torch.Tensor:
    """(H, W) label map of ids -> (1, size, size) int64 class indices (nearest), framed as the image."""
    if orientation is not None:
        label = orientation.forward(label)
        spacing = orientation.forward_spacing(spacing) if spacing is not None else None
    h, w = resized_shape(label.shape[:2], size, spacing, pixel_mm)
    lab = np.ascontiguousarray(label).astype(np.int64, copy=False)
    lut = classes.lookup(int(lab.max()) if lab.size else 0)
    idx = torch.from_numpy(lut[lab]).float()[None, None]
    if tuple(idx.shape[-2:]) != (h, w):
        idx = F.interpolate(idx, size=(h, w), mode="nearest-exact")
    if (h, w) != (size, size):
        idx = pad_crop(idx, size)
    return idx[0].round().long()


def logits_to_slice(
    logits: torch.Tensor,
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    pixel_mm: float | None = None,
    orientation: Orientation | None = None,
) -> torch.Tensor:
    """(C, size, size) logits -> (C, H, W) on the stored slice's grid (inverse of :func:`prepare_image`)."""
    H, W = int(shape[0]), int(shape[1])
    o = orientation or Orientation()
    ch, cw = (W, H) if o.transpose else (H, W)  # canonical slice shape
    cspacing = o.forward_spacing(spacing) if spacing is not None else None
    h, w = resized_shape((ch, cw), logits.shape[-1], cspacing, pixel_mm)
    if pixel_mm is not None:
        logits = unpad_crop_logits(logits, h, w)
    if tuple(logits.shape[-2:]) != (ch, cw):
        logits = F.interpolate(logits[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
    return o.inverse_torch(logits)


def load_slices(
    corpus: str | Path,
    rows: Sequence[ManifestRow],
    classes: ClassSet,
    size: int,
    pixel_mm: float | None = None,
    orientations: CaseOrientations | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All slices of ``rows`` in memory: images (N, 1, S, S) float32, targets (N, 1, S, S) int64."""
    images, targets = [], []
    for group in group_by_slice(rows).values():
        image, label, spacing = load_slice(corpus, group[0])
        o = orientations(group[0]) if orientations is not None else None
        images.append(prepare_image(image, size, spacing, pixel_mm, o))
        targets.append(prepare_label(label, classes, size, spacing, pixel_mm, o))
    if not images:
        return torch.zeros(0, 1, size, size), torch.zeros(0, 1, size, size, dtype=torch.long)
    return torch.stack(images), torch.stack(targets)


@dataclass(frozen=True)
class Augment:
    """Random affine (rotation, scale, aspect ratio, shift) and gamma, drawn per sample.

    ``scale`` < 1 zooms out (structures smaller), > 1 zooms in; ``aspect`` stretches x against y
    (slices of other shapes and spacings are resized to the same square). No flips: left/right
    structures (kidney_left, ...) would swap.
    """

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.7, 1.15)
    aspect: tuple[float, float] = (0.85, 1.18)
    shift: float = 0.08
    gamma: tuple[float, float] = (0.7, 1.5)

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen)

        def log_uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.exp(uniform(float(np.log(lo)), float(np.log(hi))))

        angle = uniform(-self.rotate_deg, self.rotate_deg) * (np.pi / 180.0)
        scale = log_uniform(*self.scale)
        aspect = log_uniform(*self.aspect)
        sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
        tx, ty = uniform(-self.shift, self.shift) * 2, uniform(-self.shift, self.shift) * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input coordinates: rotation times diag(1 / sx, 1 / sy), plus the shift
        theta = torch.stack(
            [torch.stack([cos / sx, -sin / sy, tx], 1), torch.stack([sin / sx, cos / sy, ty], 1)], 1
        ).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_targets = (
            F.grid_sample(targets.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
            .round()
            .long()
        )
        g = log_uniform(*self.gamma)
        out_images = out_images.clamp(0, 1) ** g.view(n, 1, 1, 1).to(images.dtype)
        return out_images, out_targets
