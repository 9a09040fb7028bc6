"""Synthetic lesions pasted into real slices: tumours, cysts and nodules with their masks.

A model trained only on organs segments a part of a tumour that nearly fills its box. Following
the synthetic-tumour literature (lesions generated inside real organs from shape, texture,
intensity and boundary models, e.g. Hu et al., CVPR 2023, "Label-free liver tumor
segmentation"), :func:`paste_lesion` puts one lesion into a slice, inside a labelled structure
when one is large enough (else inside the body), and returns the new image and the lesion's mask.

The models, per kind (:data:`LESION_KINDS`):

- **shape**: a star-shaped contour ``r(t) = r0 s(t) (1 + sum_k a_k cos(k t + p_k))``, k = 2..6,
  the amplitudes drawn up to the kind's irregularity (decaying as 1/k), ``s`` the superellipse
  ``(|cos t|^e + |sin t|^e)^(-1/e)`` of a drawn exponent ``e`` (2: a circle; larger: squarer, so
  the lesion fills more of its box), stretched to an ellipse of axis ratio 0.55-1 and rotated;
  ``r0`` a fraction of the image's shorter side;
- **intensity**: the lesion's mean differs from the host tissue's by a fraction of the image's
  dynamic range (cysts darker, nodules brighter, tumours either way), with part of the host's own
  texture kept (30 %);
- **texture**: Gaussian-smoothed noise of a drawn strength at two scales (a quarter of the radius
  and about a pixel); tumours often have a darker necrotic core of a drawn size, which makes the
  rest an enhancing rim when the tumour is brighter than its host;
- **compartments** (masses): the lesion split into 2-3 parts (the nearest of as many points drawn
  inside it), each brighter or darker than the host by its own drawn contrast, so that no single
  intensity range holds the whole lesion (a solid part beside a cystic or necrotic one);
- **boundary**: a ramp of drawn width across the contour (sharp capsule to infiltrative); the mask
  is the inside of the contour.

Images are (H, W) arrays of any real dtype (the corpus stores uint8); the result keeps the dtype
and stays inside the input's value range. Coordinates: rows y, columns x.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LesionKind:
    """Ranges a lesion of one kind is drawn from (uniformly).

    Attributes:
        radius: equivalent radius as a fraction of the image's shorter side.
        irregularity: largest relative amplitude of the contour's harmonics.
        contrast: |lesion mean - host mean| as a fraction of the image's value range.
        sign: +1 brighter than the host, -1 darker, 0 either (drawn).
        texture: standard deviation of the lesion's smooth noise, fraction of the value range.
        edge: width of the boundary ramp, pixels.
        core: probability of a darker necrotic core.
        core_size: its radius as a fraction of the lesion's.
        core_contrast: how much darker it is, fraction of the value range.
        squareness: the superellipse exponent of the contour (2: round; 4: a rounded square).
        tilt: the largest angle (radians) between the shape's axes and the image's; None: any.
        parts: probability of 2-3 compartments of their own contrast (see the module's doc).
    """

    radius: tuple[float, float]
    irregularity: tuple[float, float]
    contrast: tuple[float, float]
    sign: int
    texture: tuple[float, float]
    edge: tuple[float, float]
    core: float = 0.0
    core_size: tuple[float, float] = (0.3, 0.7)
    core_contrast: tuple[float, float] = (0.1, 0.35)
    squareness: tuple[float, float] = (2.0, 2.0)
    tilt: float | None = None
    parts: float = 0.0


# The version of the drawing below: embedding stores of lesion copies record it and are rebuilt
# when it changes.
LESION_MODEL_VERSION = 2

LESION_KINDS: dict[str, LesionKind] = {
    "tumour": LesionKind((0.03, 0.18), (0.04, 0.25), (0.05, 0.30), 0, (0.03, 0.15), (0.7, 3.0), core=0.6),
    "cyst": LesionKind((0.02, 0.09), (0.0, 0.05), (0.15, 0.40), -1, (0.0, 0.015), (0.5, 1.2)),
    "nodule": LesionKind((0.008, 0.03), (0.0, 0.25), (0.20, 0.50), 1, (0.0, 0.03), (0.5, 1.5)),
    # a large heterogeneous mass that fills most of a tight box (box DSC about 0.92)
    "mass": LesionKind(
        (0.06, 0.22),
        (0.0, 0.10),
        (0.08, 0.30),
        0,
        (0.02, 0.10),
        (0.5, 2.0),
        core=0.3,
        squareness=(2.5, 5.0),
        tilt=0.15,
        parts=0.8,
    ),
}

_HOST_TEXTURE_KEPT = 0.3  # of the host tissue's variation, inside the lesion


@dataclass
class Lesion:
    """One pasted lesion.

    Attributes:
        image: (H, W) the slice with the lesion, the input's dtype.
        mask: (H, W) bool, the lesion.
        kind: its kind's name.
        centre: (y, x) pixels.
        host: the label value it was placed in (0: the body, no labelled structure fitted).
    """

    image: np.ndarray
    mask: np.ndarray
    kind: str
    centre: tuple[int, int]
    host: int


def paste_lesion(
    image: np.ndarray,
    labels: np.ndarray | None,
    rng: np.random.Generator,
    kinds: Sequence[str] = tuple(LESION_KINDS),
    weights: Sequence[float] | None = None,
) -> Lesion:
    """Paste one lesion of a kind drawn from ``kinds`` into ``image`` (H, W), inside a structure
    of ``labels`` (H, W ints, 0 = background) large enough to hold it, else inside the body
    (pixels above the image's 20th percentile). ``weights`` (one per kind, relative) makes some
    kinds more frequent than others; ``None`` draws them uniformly (:func:`draw_kind`).

    Raises ValueError for an image that is not 2D, is constant, is smaller than 16 px or has
    no room for a lesion.
    """
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"a lesion needs a 2D slice of at least 16 x 16 pixels, got shape {img.shape}")
    unknown = sorted(set(kinds) - set(LESION_KINDS))
    if unknown or not kinds:
        raise ValueError(f"lesion kinds must be among {sorted(LESION_KINDS)}, got {list(kinds)}")
    values = img.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise ValueError("a constant image has no tissue to place a lesion in")
    name = draw_kind(rng, kinds, weights)
    kind = LESION_KINDS[name]
    H, W = img.shape
    contour = _Contour.draw(kind, rng)
    r0 = max(float(rng.uniform(*kind.radius)) * min(H, W), 3.0)
    centre, host, r0 = _place(values, labels, r0, contour.reach, rng)
    inside, alpha, core = contour.raster(img.shape, centre, r0, kind, rng)
    span = hi - lo
    host_mean = float(values[inside].mean())
    mean: float | np.ndarray = _level(host_mean, kind, span, lo, hi, rng)
    if kind.parts > 0 and rng.random() < kind.parts:
        mean = _compartments(inside, host_mean, kind, span, lo, hi, rng)
    field = mean + _HOST_TEXTURE_KEPT * (values - host_mean)
    strength = float(rng.uniform(*kind.texture)) * span
    if strength > 0:
        coarse, fine = _smooth_noise(img.shape, max(1.0, r0 / 4.0), rng), _smooth_noise(img.shape, 1.0, rng)
        field += strength * (0.7 * coarse + 0.3 * fine)
    if core is not None:
        field -= core * float(rng.uniform(*kind.core_contrast)) * span
    out = values * (1.0 - alpha) + np.clip(field, lo, hi) * alpha
    out = np.clip(out, lo, hi)
    if np.issubdtype(img.dtype, np.integer):
        out = np.rint(out)
    return Lesion(out.astype(img.dtype), inside, name, centre, host)


def paste_lesions(
    image: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator, kinds: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one lesion of each of ``kinds``, in turn, into ``image`` (H, W) as
    :func:`paste_lesion` does, each away from the ones before (their pixels and a 3 px margin
    leave the host structures of ``labels``).

    Returns the image and an (H, W) uint8 label map: ``k + 1`` where ``kinds[k]``'s lesion is (a
    later lesion covers an earlier one where they meet, which only happens without ``labels``).
    """
    from scipy import ndimage

    if len(kinds) > 255:
        raise ValueError(f"at most 255 lesions fit a uint8 label map, got {len(kinds)}")
    out = np.asarray(image)
    hosts = None if labels is None else np.array(labels, copy=True)
    lesion_map = np.zeros(out.shape, np.uint8)
    for k, kind in enumerate(kinds):
        lesion = paste_lesion(out, hosts, rng, [kind])
        out = lesion.image
        lesion_map[lesion.mask] = k + 1
        if hosts is not None:
            hosts[ndimage.binary_dilation(lesion.mask, iterations=3)] = 0
    return out, lesion_map


def _level(host_mean: float, kind: LesionKind, span: float, lo: float, hi: float, rng: np.random.Generator) -> float:
    """A lesion's (or a compartment's) mean: the host's moved by a drawn contrast, to the kind's
    side (or a drawn one), to the other side where the value range leaves no room."""
    sign = kind.sign or (1 if rng.random() < 0.5 else -1)
    delta = float(rng.uniform(*kind.contrast)) * span
    if not lo <= host_mean + sign * delta <= hi:
        sign = -sign
    return float(np.clip(host_mean + sign * delta, lo, hi))


def _compartments(
    inside: np.ndarray, host_mean: float, kind: LesionKind, span: float, lo: float, hi: float, rng: np.random.Generator
) -> np.ndarray:
    """(H, W) the mean of each pixel's compartment: 2-3 points drawn inside the lesion, every
    pixel belonging to the nearest, each compartment of its own :func:`_level` (two at least on
    opposite sides of the host when the range allows)."""
    from scipy import ndimage

    ys, xs = np.nonzero(inside)
    n = int(rng.integers(2, 4))
    picks = rng.choice(len(ys), size=min(n, len(ys)), replace=False)
    H, W = inside.shape
    yy, xx = np.mgrid[0:H, 0:W]
    scale = float(np.sqrt(len(ys) / np.pi))  # the lesion's equivalent radius
    distance = np.stack(
        [np.hypot(yy - ys[k], xx - xs[k]) + 0.3 * scale * _smooth_noise(inside.shape, scale / 3, rng) for k in picks]
    )  # wavy borders between the parts
    levels = np.array([_level(host_mean, kind, span, lo, hi, rng) for _ in picks])
    if len(levels) > 1 and (np.all(levels > host_mean) or np.all(levels < host_mean)):
        flipped = 2 * host_mean - levels[-1]  # one part on the other side of the host
        if lo <= flipped <= hi:
            levels[-1] = flipped
    return ndimage.gaussian_filter(levels[np.argmin(distance, axis=0)], 0.7)


def draw_kind(rng: np.random.Generator, kinds: Sequence[str], weights: Sequence[float] | None = None) -> str:
    """The first draw of every lesion: its kind, uniform over ``kinds`` or in proportion to
    ``weights`` (one non-negative number per kind, not all zero)."""
    if weights is None:
        return str(kinds[int(rng.integers(len(kinds)))])
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(kinds),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"lesion weights must be one non-negative number per kind, not all 0; got {list(weights)}")
    return str(kinds[int(rng.choice(len(kinds), p=w / w.sum()))])


def seeded_lesion_kind(seed: int, path: str, variant: int, kinds: Sequence[str]) -> str:
    """The kind of :func:`seeded_lesion` (``seed``, ``path``, ``variant``, ``kinds``) without
    drawing the lesion."""
    return draw_kind(_seeded_rng(seed, path, variant), kinds)


def _seeded_rng(seed: int, path: str, variant: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(path.encode()), variant])


def seeded_lesion(
    image: np.ndarray, labels: np.ndarray | None, seed: int, path: str, variant: int, kinds: Sequence[str]
) -> Lesion:
    """Lesion ``variant`` of the slice stored at ``path``: :func:`paste_lesion` with the random
    state of (``seed``, the path's CRC-32, ``variant``), the same wherever and whenever it is drawn
    (training stores and evaluation corpora)."""
    return paste_lesion(image, labels, _seeded_rng(seed, path, variant), kinds)


def _place(
    values: np.ndarray, labels: np.ndarray | None, r0: float, reach: float, rng: np.random.Generator
) -> tuple[tuple[int, int], int, float]:
    """A centre (y, x), its host label (0: the body) and the radius ``r0``, shrunk so that the
    contour (at most ``reach x r0`` from the centre) lies inside the host structure."""
    from scipy import ndimage

    H, W = values.shape
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != values.shape:
            raise ValueError(f"labels {lab.shape} do not match the image {values.shape}")
        # The depth of every structure (distance to its border), each within its bounding box.
        fits: list[tuple[int, float, tuple[slice, ...], np.ndarray]] = []
        for index, where in enumerate(ndimage.find_objects(lab.astype(np.int64, copy=False))):
            if where is None:  # no pixel of label index + 1
                continue
            region = np.pad(lab[where] == index + 1, 1)
            depth = ndimage.distance_transform_edt(region)[1:-1, 1:-1]
            radius = min(r0, (float(depth.max()) - 1.5) / reach)
            if radius >= 2.0:
                fits.append((index + 1, radius, where, depth))
        if fits:
            roomy = [f for f in fits if f[1] >= 0.6 * r0]  # hold the drawn size (nearly)
            if roomy:
                areas = np.array([float((f[3] > 0).sum()) for f in roomy])
                host, radius, where, depth = roomy[int(rng.choice(len(roomy), p=areas / areas.sum()))]
            else:
                host, radius, where, depth = max(fits, key=lambda f: f[1])
            ys, xs = np.nonzero(depth >= min(radius * reach + 1.5, float(depth.max())))
            k = int(rng.integers(len(ys)))
            return (int(ys[k]) + where[0].start, int(xs[k]) + where[1].start), host, radius
    margin = int(np.ceil(reach * r0)) + 2
    if 2 * margin >= min(H, W):
        r0 = max(2.0, (min(H, W) / 2 - 3) / reach)
        margin = int(np.ceil(reach * r0)) + 2
    room = np.zeros((H, W), dtype=bool)
    room[margin : H - margin, margin : W - margin] = True
    if not room.any():
        raise ValueError("the image has no room for a lesion")
    body = room & (values > np.percentile(values, 20))
    ys, xs = np.nonzero(body if body.any() else room)
    k = int(rng.integers(len(ys)))
    return (int(ys[k]), int(xs[k])), 0, r0


@dataclass(frozen=True)
class _Contour:
    """A drawn star-shaped contour: harmonics (k = 2..6), an ellipse's axis ratio and angle."""

    amplitudes: np.ndarray
    phases: np.ndarray
    ratio: float
    angle: float
    exponent: float = 2.0

    @classmethod
    def draw(cls, kind: LesionKind, rng: np.random.Generator) -> _Contour:
        amplitude = float(rng.uniform(*kind.irregularity))
        k = np.arange(2, 7)
        amplitudes = amplitude / (k - 1) * rng.uniform(-1, 1, size=len(k))
        phases = rng.uniform(0, 2 * np.pi, size=len(k))
        ratio = float(rng.uniform(0.55, 1.0))
        if kind.tilt is None:
            angle = float(rng.uniform(0, np.pi))
        else:  # near one of the image's axes
            angle = float(rng.integers(2)) * np.pi / 2 + float(rng.uniform(-kind.tilt, kind.tilt))
        low, high = kind.squareness
        exponent = float(rng.uniform(low, high)) if high > low else float(low)
        return cls(amplitudes, phases, ratio, angle, exponent)

    def factor(self, theta: np.ndarray) -> np.ndarray:
        """The contour's radius at angles ``theta``, in units of ``r0`` (at least 0.4)."""
        k = np.arange(2, 7).reshape(-1, *([1] * theta.ndim))
        harmonics = (self.amplitudes.reshape(k.shape) * np.cos(k * theta + self.phases.reshape(k.shape))).sum(0)
        radius = np.clip(1.0 + harmonics, 0.4, None)
        if self.exponent != 2.0:
            e = self.exponent
            radius = radius * (np.abs(np.cos(theta)) ** e + np.abs(np.sin(theta)) ** e) ** (-1.0 / e)
        return radius

    @property
    def reach(self) -> float:
        """The farthest the contour gets from the centre, in units of ``r0``."""
        return float(self.factor(np.linspace(0, 2 * np.pi, 721)).max())

    def raster(
        self, size: tuple[int, ...], centre: tuple[int, int], r0: float, kind: LesionKind, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(inside mask, blend weight in [0, 1], core weight or None) on an (H, W) grid."""
        H, W = size
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
        dy, dx = yy - centre[0], xx - centre[1]
        u = dx * np.cos(self.angle) + dy * np.sin(self.angle)
        v = (-dx * np.sin(self.angle) + dy * np.cos(self.angle)) / self.ratio
        rho = np.hypot(u, v)
        radius = r0 * self.factor(np.arctan2(v, u))
        distance = rho - radius  # < 0 inside; the shape is narrower across (ratio < 1)
        edge = float(rng.uniform(*kind.edge))
        alpha = 0.5 * (1.0 - np.tanh(distance / edge))
        inside = distance < 0
        inside[centre] = True
        core = None
        if kind.core > 0 and rng.random() < kind.core:
            size = float(rng.uniform(*kind.core_size))
            core = 0.5 * (1.0 - np.tanh((rho - size * radius) / max(edge, 1.0)))
        return inside, alpha, core


def _smooth_noise(size: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) Gaussian-smoothed white noise scaled to unit standard deviation."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(size), sigma)
    std = float(noise.std())
    return noise / std if std > 0 else noise
