"""Videos as frame stacks: a folder of frames, a multi-page TIFF, or a video file, read into one
``(T, H, W, 3)`` uint8 array (grey frames ``(T, H, W)``), and a label map per frame written back.

* **A folder of frames**: the PNG / JPEG / BMP / TIFF files in it (not its subfolders), ordered by
  the numbers in their names (``frame_2.jpg`` before ``frame_10.jpg``; SAM2's ``00000.jpg``
  naming included), then by name. All frames must have one size. Colour frames are read as RGB
  (Pillow's ``convert("RGB")``, as SAM2's video predictor reads its JPEG folders); a folder of
  grey frames stays grey.
* **A multi-page TIFF** (``.tif`` / ``.tiff`` with more than one page) through tifffile; as an
  input of ``medsam segment`` only a stack of colour pages counts as a video (a grey stack is a
  volume).
* **A video file** (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``) decoded by PyAV (FFmpeg;
  the ``video`` extra) into RGB frames; its frame rate is kept.

:func:`write_frame_labels` writes a ``(T, H, W)`` label map as one PNG per frame into a folder
(named after the input frames, ``.png``) or as a multi-page TIFF, atomically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_output

__all__ = [
    "FRAME_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Video",
    "check_video_output",
    "is_video",
    "read_video",
    "write_frame_labels",
]

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
_MAX_FRAMES = 100_000


@dataclass
class Video:
    """Frames read from one source.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB, or ``(T, H, W)`` for grey frames.
        names: one name per frame (the file stem for a folder, ``frame_00000`` ... otherwise).
        fps: frames per second of a video file, else None.
        source: ``"folder"``, ``"tiff"`` or ``"video"``.
    """

    frames: np.ndarray
    names: list[str] = field(default_factory=list)
    fps: float | None = None
    source: str = "folder"

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def _frame_files(folder: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES
        ),
        key=lambda p: _natural_key(p.name),
    )


def is_video(path: str | Path) -> bool:
    """True for a video file suffix, a folder holding frame images (and no DICOM files), or a
    TIFF stack of colour pages (a grey stack is read as a volume by :func:`medsam.io.read_image`)."""
    p = Path(path)
    if p.is_dir():
        names = [e.name.lower() for e in p.iterdir() if e.is_file()]
        return any(n.endswith(FRAME_SUFFIXES) for n in names) and not any(
            n.endswith((".dcm", ".dicom", ".ima")) for n in names
        )
    if p.suffix.lower() in (".tif", ".tiff") and p.is_file():
        import tifffile

        try:
            with tifffile.TiffFile(p) as tif:
                shape = tif.series[0].shape
        except Exception:  # not a readable TIFF: read_image reports it
            return False
        return len(shape) == 4 and shape[-1] in (3, 4)
    return p.suffix.lower() in VIDEO_SUFFIXES


def check_video_output(output_path: str | Path) -> None:
    """A video's masks go to a folder (no suffix) or a ``.tif`` / ``.tiff``; ValueError otherwise."""
    out = Path(output_path)
    if out.suffix and out.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"the masks of a video go to a folder (one PNG per frame) or a .tif / .tiff, got {out.name}")
    if not out.suffix and out.is_file():
        raise ValueError(f"{out} is a file: name a folder for the per-frame masks")


def read_video(path: str | Path) -> Video:
    """Read the frames of ``path`` (see the module); raises ValueError naming the problem."""
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file or folder")
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            array = np.asarray(tifffile.imread(p))
        except Exception as exc:  # tifffile raises many kinds for a broken file
            raise ValueError(f"{p.name}: not a readable TIFF ({str(exc).splitlines()[0][:120]})") from None
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"{p.name}: expected pages of (H, W) or (H, W, 3), got shape {array.shape}")
        array = _as_uint8(array[..., :3] if array.ndim == 4 else array)
        return Video(array, [f"frame_{i:05d}" for i in range(array.shape[0])], None, "tiff")
    if suffix in VIDEO_SUFFIXES:
        return _read_video_file(p)
    raise ValueError(f"{p.name}: not a video (a folder of frames, a multi-page TIFF or {', '.join(VIDEO_SUFFIXES)})")


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or (np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255):
        return array.astype(np.uint8)
    from ..intensity import minmax_to_uint8

    return minmax_to_uint8(array)


def _read_folder(folder: Path) -> Video:
    from PIL import Image

    files = _frame_files(folder)
    if not files:
        raise ValueError(f"{folder}: no frame images ({', '.join(FRAME_SUFFIXES)})")
    if len(files) > _MAX_FRAMES:
        raise ValueError(f"{folder}: more than {_MAX_FRAMES} frames")
    frames = []
    grey = True
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                grey = grey and im.mode in ("L", "I;16", "I", "1")
                frames.append(im.copy())
        except Exception as exc:  # Pillow raises many kinds for a broken file
            raise ValueError(f"{f.name}: not a readable image ({str(exc).splitlines()[0][:120]})") from None
    arrays = [np.asarray(im.convert("L" if grey else "RGB")) for im in frames]
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{folder}: two frames share a name ({sorted(s for s in stems if stems.count(s) > 1)[0]})")
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"{folder}: frames of different sizes {sorted(sizes)[:3]}")
    return Video(np.stack(arrays), stems, None, "folder")


def _read_video_file(path: Path) -> Video:
    try:
        import av
    except ImportError:
        raise ValueError(f"{path.name}: reading video files needs PyAV: pip install 'medsam[video]'") from None
    frames = []
    rate = None
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            if streams:
                rate = streams[0].average_rate
                for frame in container.decode(streams[0]):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) > _MAX_FRAMES:
                        break
    except Exception as exc:  # av.error.* (some are ValueErrors) for a broken or unsupported file
        raise ValueError(f"{path.name}: not a readable video ({str(exc).splitlines()[0][:120]})") from None
    if len(frames) > _MAX_FRAMES:
        raise ValueError(f"{path.name}: more than {_MAX_FRAMES} frames")
    if not frames:
        raise ValueError(f"{path.name}: no video frames")
    fps = float(rate) if rate else None
    return Video(np.stack(frames), [f"frame_{i:05d}" for i in range(len(frames))], fps, "video")


def write_frame_labels(labels: np.ndarray, names: list[str], out: str | Path) -> Path:
    """Write ``labels`` ``(T, H, W)`` (values 0..255, or 0..65535 for many objects) as a folder of
    PNGs named ``names[t] + ".png"`` (``out`` without a TIFF suffix; created, files replaced
    atomically one by one) or as one multi-page TIFF (``out`` ending in ``.tif`` / ``.tiff``)."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or len(names) != labels.shape[0]:
        raise ValueError(f"expected (T, H, W) labels and T names, got {labels.shape} and {len(names)} names")
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    labels = labels.astype(dtype)
    out = Path(out)
    if out.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with atomic_output(out) as tmp:
            tifffile.imwrite(tmp, labels, photometric="minisblack")
        return out
    if out.suffix:
        raise ValueError(f"{out.name}: write per-frame masks into a folder (no suffix) or a .tif / .tiff")
    import os
    import shutil
    import tempfile

    from PIL import Image

    if out.is_dir():  # an existing folder: each file replaced atomically
        for name, plane in zip(names, labels):
            with atomic_output(out / f"{name}.png") as tmp:
                Image.fromarray(plane).save(tmp, format="PNG")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # a new folder appears whole or not at all
        for name, plane in zip(names, labels):
            Image.fromarray(plane).save(staging / f"{name}.png", format="PNG")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
