"""CVPR 2024 "MedSAM on Laptop" challenge ``.npz`` cases.

A case file holds

* ``imgs``  - a 2D image ``(H, W, 3)`` uint8 (a grey ``(H, W)`` is accepted too),
  or a volume ``(D, H, W)`` = ``(Z, Y, X)``, intensities already in [0, 255];
* ``boxes`` - prompts, one per target: ``(N, 4)`` ``[x0, y0, x1, y1]`` for 2D,
  ``(N, 6)`` ``[x0, y0, z0, x1, y1, z1]`` for 3D (pixel/voxel indices,
  x = column, y = row, z = slice);
* ``spacing`` - 3D cases only, optional; the challenge stores SimpleITK's
  ``GetSpacing()``, i.e. **(x, y, z) order, not the (D, H, W) order of imgs**;
* ``gts`` - optional ground-truth labels with the spatial shape of ``imgs``.

The file name tells 2D from 3D (``2D_...`` / ``3D_...``); without a prefix the
array shape decides. A prediction file holds ``segs`` (uint8, label ``n`` is
the object of box ``n``, 1-based; 0 is background).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import ImageReadError

__all__ = ["NpzCase", "read_npz_case", "write_npz_segs"]


@dataclass(eq=False)
class NpzCase:
    """One challenge case. See the module docstring for the array layout.

    ``boxes`` is always an array: ``(0, 4)`` / ``(0, 6)`` when the file has
    no ``boxes`` key (training files). ``spacing`` is kept exactly as stored
    (challenge convention: (x, y, z)); use :attr:`spacing_zyx` to line it up
    with ``imgs``' axes.
    """

    imgs: np.ndarray
    boxes: np.ndarray
    is_volume: bool
    spacing: np.ndarray | None = None
    gts: np.ndarray | None = None
    path: Path | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """``(D, H, W)`` for a volume, ``(H, W)`` for a 2D case."""
        return tuple(self.imgs.shape[:3] if self.is_volume else self.imgs.shape[:2])

    @property
    def n_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def spacing_xyz(self) -> tuple[float, ...] | None:
        """The stored spacing, (x, y, z) by the challenge convention."""
        return None if self.spacing is None else tuple(float(s) for s in self.spacing)

    @property
    def spacing_zyx(self) -> tuple[float, ...] | None:
        """Spacing in ``imgs`` axis order ``(D, H, W)`` (the stored (x, y, z) reversed)."""
        return None if self.spacing is None else tuple(float(s) for s in self.spacing[::-1])


def _bad(path: Path, msg: str) -> ImageReadError:
    return ImageReadError(f"{path}: {msg}")


def read_npz_case(path: str | Path) -> NpzCase:
    """Read and validate a challenge case file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        # open the file ourselves: np.load leaks its handle when the zip is corrupt
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
            keys = set(data.files)
            if "imgs" not in keys:
                raise _bad(path, f"no 'imgs' array (keys: {sorted(keys)})")
            imgs = np.asarray(data["imgs"])
            boxes = np.asarray(data["boxes"]) if "boxes" in keys else None
            spacing = np.asarray(data["spacing"], dtype=np.float64) if "spacing" in keys else None
            gts = np.asarray(data["gts"]) if "gts" in keys else None
    except ImageReadError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _bad(path, f"cannot read npz file ({exc})") from exc

    name = path.name
    if name.startswith("3D"):
        is_volume = True
    elif name.startswith("2D"):
        is_volume = False
    else:
        is_volume = imgs.ndim == 3 and imgs.shape[-1] != 3
    if is_volume:
        if imgs.ndim != 3:
            raise _bad(path, f"3D case needs imgs of shape (D, H, W), got {imgs.shape}")
        spatial = imgs.shape
    else:
        if not (imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[-1] == 3)):
            raise _bad(path, f"2D case needs imgs of shape (H, W, 3) or (H, W), got {imgs.shape}")
        spatial = imgs.shape[:2]
    if not (np.issubdtype(imgs.dtype, np.number) or imgs.dtype == bool):
        raise _bad(path, f"imgs has non-numeric dtype {imgs.dtype}")

    width = 6 if is_volume else 4
    if boxes is None:
        boxes = np.zeros((0, width), dtype=np.int64)
    else:
        if boxes.ndim == 1 and boxes.size == width:
            boxes = boxes.reshape(1, width)
        if boxes.ndim != 2 or boxes.shape[1] != width:
            layout = "[x0, y0, z0, x1, y1, z1]" if is_volume else "[x0, y0, x1, y1]"
            raise _bad(
                path,
                f"boxes must be (N, {width}) {layout} for a "
                f"{'3D' if is_volume else '2D'} case, got shape {boxes.shape}",
            )
        if not np.issubdtype(boxes.dtype, np.number) or not np.all(np.isfinite(boxes)):
            raise _bad(path, "boxes must be finite numbers")
        half = width // 2
        bad = np.nonzero(np.any(boxes[:, :half] > boxes[:, half:], axis=1))[0]
        if bad.size:
            raise _bad(path, f"box {int(bad[0])} has min > max: {boxes[bad[0]].tolist()}")
    if spacing is not None:
        spacing = spacing.reshape(-1)
        if is_volume and spacing.size != 3:
            raise _bad(path, f"spacing must have 3 values (x, y, z), got {spacing.tolist()}")
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise _bad(path, f"spacing must be positive, got {spacing.tolist()}")
    if gts is not None and tuple(gts.shape) != tuple(spatial):
        raise _bad(path, f"gts shape {gts.shape} does not match imgs' spatial shape {tuple(spatial)}")
    return NpzCase(imgs=imgs, boxes=boxes, is_volume=is_volume, spacing=spacing, gts=gts, path=path)


def write_npz_segs(path: str | Path, segs, spacing=None) -> Path:
    """Write predictions as ``segs`` (uint8) with ``np.savez_compressed``, atomically.

    ``segs`` is ``(H, W)`` or ``(D, H, W)``; label ``n`` (1..N) is the object
    of box ``n``. ``spacing``, if given, is stored as is (keep the case's
    (x, y, z) convention: pass ``case.spacing``).
    """
    path = Path(path)
    segs = np.asarray(segs)
    if segs.ndim not in (2, 3):
        raise ValueError(f"segs must be (H, W) or (D, H, W), got shape {segs.shape}")
    if segs.dtype == bool:
        segs = segs.astype(np.uint8)
    if not np.issubdtype(segs.dtype, np.integer):
        raise ValueError(f"segs must hold integer labels, got dtype {segs.dtype}")
    if segs.size and (segs.min() < 0 or segs.max() > 255):
        raise ValueError(f"segs labels must lie in 0..255 (uint8), got {segs.min()}..{segs.max()}")
    arrays = {"segs": segs.astype(np.uint8)}
    if spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spacing must be positive numbers, got {sp.tolist()}")
        arrays["spacing"] = sp
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path
