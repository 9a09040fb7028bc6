"""The in-memory image type :class:`MedicalImage` and geometry checks.

Axis conventions (the single source of truth for the whole package)
-------------------------------------------------------------------

Arrays follow SimpleITK / NumPy C order, i.e. the file's voxel index order
``(i, j, k)`` *reversed*:

* a volume is ``array[k, j, i]`` with shape ``(Z, Y, X)`` = (slices, rows, columns);
* a 2D grey image is ``array[j, i]`` with shape ``(H, W)`` = ``(Y, X)``;
* a 2D colour image is ``(H, W, C)`` with ``C`` = 3 (RGB) or 4 (RGBA);
  colour volumes are not supported.

Geometry follows ITK and is always in *physical* ``(x, y, z)`` order, in the
DICOM/ITK patient frame LPS (x = right->Left, y = anterior->Posterior,
z = inferior->Superior), millimetres:

* ``spacing[d]``   - voxel size along index axis ``d`` of ``(i, j, k)``;
* ``origin``       - physical position of the centre of voxel ``(0, 0, 0)``;
* ``direction``    - ``(G, G)`` matrix whose *column* ``d`` is the unit
  physical direction of index axis ``d`` (``SetDirection`` takes it
  flattened row by row).

So ``physical = origin + direction @ (spacing * (i, j, k))``.

``spacing`` is therefore **not** in array-axis order. Use
:attr:`MedicalImage.spacing_zyx` (an alias with an explicit name:
:attr:`MedicalImage.array_spacing`) whenever a spacing must line up with
array axes, e.g. for surface distances or resampling of ``array``. The
MedSAM release stored SimpleITK's (x, y, z) spacing next to (z, y, x)
arrays; keeping the two names apart is what prevents that bug here.

A 2D image read from a 3D container with one slice (a NIfTI/NRRD/MHA of
size X x Y x 1, a single DICOM slice) keeps its 3D geometry
(``geometry_ndim == 3``) so that a mask can be written back exactly; its
array is ``(H, W)`` and the implicit slice index ``k`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = ["MedicalImage", "check_same_geometry"]


def _as_float_tuple(values, name: str) -> tuple[float, ...]:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {tuple(arr.tolist())}")
    return tuple(float(v) for v in arr)


@dataclass(eq=False)
class MedicalImage:
    """An image array together with the geometry needed to write it back.

    Attributes
    ----------
    array:
        Pixel data: ``(Z, Y, X)`` for a volume, ``(H, W)`` for a grey 2D image,
        ``(H, W, C)`` (C = 3 or 4) for a colour 2D image. See the module
        docstring for the full convention.
    spacing:
        Voxel size in mm in ITK physical order ``(x, y, z)`` (length 2 or 3,
        ``geometry_ndim``). Same as :attr:`spacing_xyz`; **not** array order.
    origin:
        Physical position (LPS, mm) of voxel ``(0, 0[, 0])``, ``(x, y[, z])``.
    direction:
        ``(G, G)`` direction cosines; column ``d`` is index axis ``d`` (i, j, k).
    is_color:
        True when the last array axis holds RGB(A) channels.
    source_path:
        File or folder the image was read from (``None`` if built in memory).
    source_format:
        ``"nifti"``, ``"nrrd"``, ``"metaimage"``, ``"dicom-series"``,
        ``"dicom"``, ``"png"``, ``"jpeg"``, ``"bmp"``, ``"tiff"`` or ``None``.
    series_uid:
        DICOM SeriesInstanceUID, for DICOM input.
    modality:
        DICOM Modality (``"CT"``, ``"MR"``, ``"PT"`` ...) when known.
    source_files:
        For a DICOM series: slice files in array order (``array[k]`` comes
        from ``source_files[k]``).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    is_color: bool = False
    source_path: Path | None = None
    source_format: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    source_files: tuple[str, ...] = field(default_factory=tuple)

    # ------------------------------------------------------------------ setup
    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.is_color = bool(self.is_color)
        if self.is_color and (self.array.ndim != 3 or self.array.shape[-1] not in (3, 4)):
            raise ValueError(f"a colour image must be (H, W, 3) or (H, W, 4), got array shape {self.array.shape}")
        nd = self.ndim_spatial
        if nd not in (2, 3):
            raise ValueError(
                f"array must have 2 or 3 spatial axes, got shape {self.array.shape}"
                + (" (colour)" if self.is_color else "")
            )
        self.spacing = _as_float_tuple(self.spacing, "spacing")
        self.origin = _as_float_tuple(self.origin, "origin")
        g = len(self.spacing)
        if g not in (2, 3) or g < nd:
            raise ValueError(f"spacing has {g} values but the array has {nd} spatial axes (shape {self.array.shape})")
        if len(self.origin) != g:
            raise ValueError(f"origin has {len(self.origin)} values, spacing has {g}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        d = np.asarray(self.direction, dtype=np.float64)
        if d.size == g * g:
            d = d.reshape(g, g)
        if d.shape != (g, g):
            raise ValueError(f"direction must be a {g}x{g} matrix, got shape {d.shape}")
        if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
            raise ValueError(f"direction matrix is singular or not finite:\n{d}")
        self.direction = d
        if self.source_path is not None:
            self.source_path = Path(self.source_path)
        self.source_files = tuple(str(f) for f in self.source_files)

    # ------------------------------------------------------------ shape info
    @property
    def ndim_spatial(self) -> int:
        """Number of spatial array axes: 2 for images, 3 for volumes."""
        return self.array.ndim - (1 if self.is_color else 0)

    @property
    def is_volume(self) -> bool:
        """True for a ``(Z, Y, X)`` volume."""
        return self.ndim_spatial == 3

    @property
    def geometry_ndim(self) -> int:
        """Length of ``spacing``/``origin``: 3 also for a one-slice 2D image of a 3D file."""
        return len(self.spacing)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Array shape without the colour axis: ``(Z, Y, X)`` or ``(H, W)``."""
        return tuple(self.array.shape[: self.ndim_spatial])

    @property
    def size_xyz(self) -> tuple[int, ...]:
        """Number of voxels in ITK order ``(X, Y[, Z])`` (``Z`` = 1 for a one-slice image)."""
        size = tuple(reversed(self.spatial_shape))
        if len(size) < self.geometry_ndim:
            size = size + (1,)
        return size

    # -------------------------------------------------------- spacing views
    @property
    def spacing_xyz(self) -> tuple[float, ...]:
        """Spacing in ITK physical order ``(x, y[, z])`` - the stored ``spacing``."""
        return self.spacing

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        """Spacing in *array axis order*: ``(z, y, x)`` for a volume, ``(y, x)`` for 2D.

        ``len(spacing_zyx) == ndim_spatial`` always; element ``a`` is the
        spacing along ``array`` axis ``a``.
        """
        return tuple(reversed(self.spacing[: self.ndim_spatial]))

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Alias of :attr:`spacing_zyx`: spacing along each array axis, in array order."""
        return self.spacing_zyx

    @property
    def affine_lps(self) -> np.ndarray:
        """``(G+1, G+1)`` matrix mapping index ``(i, j[, k], 1)`` to LPS millimetres."""
        g = self.geometry_ndim
        a = np.eye(g + 1)
        a[:g, :g] = self.direction * np.asarray(self.spacing)[None, :]
        a[:g, g] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 index ``(i, j, k, 1)`` -> RAS mm matrix, as nibabel's ``img.affine``.

        Only defined for 3D geometry (including one-slice 2D images).
        """
        if self.geometry_ndim != 3:
            raise ValueError("affine_ras needs 3D geometry; this image has 2D geometry")
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    # --------------------------------------------------------------- helpers
    def with_array(self, array: np.ndarray, *, is_color: bool = False) -> MedicalImage:
        """A new image with the same geometry and metadata and another array.

        ``array`` must have this image's :attr:`spatial_shape` (plus a colour
        axis when ``is_color``).
        """
        array = np.asarray(array)
        spatial = array.shape[:-1] if is_color else array.shape
        if tuple(spatial) != self.spatial_shape:
            raise ValueError(f"array spatial shape {tuple(spatial)} does not match the image's {self.spatial_shape}")
        return replace(self, array=array, is_color=is_color)

    def __repr__(self) -> str:  # compact, without dumping the array
        src = f", source={str(self.source_path)!r}" if self.source_path else ""
        return (
            f"MedicalImage(shape={self.array.shape}, dtype={self.array.dtype}, "
            f"{'volume' if self.is_volume else '2D'}{', colour' if self.is_color else ''}, "
            f"spacing_xyz={self.spacing}, origin={self.origin}{src})"
        )


def check_same_geometry(a: MedicalImage, b: MedicalImage, atol: float = 1e-4) -> None:
    """Raise ``ValueError`` naming every geometric property in which ``a`` and ``b`` differ.

    Compared: spatial shape (colour channels ignored), geometry dimension,
    spacing, origin (absolute tolerance ``atol`` mm) and direction
    (absolute tolerance ``atol``).
    """
    problems: list[str] = []
    if a.spatial_shape != b.spatial_shape:
        problems.append(f"shape {a.spatial_shape} vs {b.spatial_shape} (array order)")
    if a.geometry_ndim != b.geometry_ndim:
        problems.append(f"geometry dimension {a.geometry_ndim} vs {b.geometry_ndim}")
    else:
        if not np.allclose(a.spacing, b.spacing, rtol=0, atol=atol):
            problems.append(f"spacing (x, y, z) {a.spacing} vs {b.spacing}")
        if not np.allclose(a.origin, b.origin, rtol=0, atol=atol):
            problems.append(f"origin {a.origin} vs {b.origin}")
        if not np.allclose(a.direction, b.direction, rtol=0, atol=atol):
            problems.append(f"direction {np.round(a.direction, 6).tolist()} vs {np.round(b.direction, 6).tolist()}")
    if problems:
        raise ValueError("images do not share the same geometry: " + "; ".join(problems))
