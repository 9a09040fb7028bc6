"""Label maps of the datastore: versioned, saved atomically, with a provenance sidecar.

Files (under ``DATA/.medsam/labels/``), for image id ``ID``:

* ``ID`` + ``.nii.gz``: the label map of a volume, of a DICOM series, or of a 2D image read from
  a container with geometry (NIfTI, NRRD, MHA, DICOM), written by :func:`medsam.io.write_mask`
  with exactly the image's spacing, origin and direction (``ct.nii.gz`` -> ``ct.nii.gz.nii.gz``);
* ``ID`` + ``.png``: the label map of a plain 2D picture (PNG, JPEG, BMP, TIFF), pixel values =
  label values (``x.jpg`` -> ``x.jpg.png``, ``x.png`` -> ``x.png.png``);
* the label file name + ``.json``: the provenance sidecar::

      {"format": 1, "image_id": ..., "version": 3, "created": ..., "updated": ...,
       "label_file": "ct.nii.gz", "label_sha256": ...,
       "labels": [{"value": 1, "name": "liver", "color": "#e6194b"}, ...],
       "model": {"name": "lite", "checkpoint": ..., "checkpoint_sha256": ..., "fingerprint": ...},
       "history": [{"version": 3, "time": ..., "action": "slice", "slice": 12,
                    "prompts": [...], "edits": [...], "model": {...}}, ...]}

The suffix is always appended, never merged with one the id already has, so two image ids can
never name one label file (ids are distinct paths, and the two suffixes differ). ``layout.json``
records this layout (version 2); :meth:`LabelStore.migrate` moves the files of a datastore written
with the earlier layout (version 1: the suffix was left off when the id already ended in it, so
``x.jpg`` and ``x.jpg.png`` shared ``x.jpg.png``), each file to where its sidecar's image id now
puts it, and can be interrupted and rerun.

Versions and concurrency. ``version`` starts at 0 (nothing saved) and grows by one per save.
Every write names the version it was based on (HTTP ``If-Match``); a write based on an older
version raises :class:`VersionConflict` (409) and changes nothing. Writes of one image are
serialised by a thread lock and, where the OS has it, an ``flock`` on a lock file, so two server
processes on one folder are safe too. The label file is written first, then the sidecar, each by
write-to-temporary + ``os.replace``: a crash leaves the previous complete file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..io import MedicalImage, read_image, write_mask
from ..io.atomic import write_json
from ..overlay import PALETTE

__all__ = ["LabelRecord", "LabelStore", "VersionConflict", "default_definitions", "now_iso"]

SIDECAR_FORMAT = 1
LAYOUT_VERSION = 2
LAYOUT_FILE = "layout.json"
_PLAIN_2D_FORMATS = {"png", "jpeg", "bmp", "tiff"}
_MAX_HISTORY = 5000


def _layout_version(marker: Path) -> int:
    try:
        return int(json.loads(marker.read_text()).get("layout", 1))
    except (OSError, ValueError, AttributeError, TypeError):
        return 1


class VersionConflict(RuntimeError):
    """A write based on a version that is no longer the current one."""

    def __init__(self, current: int, expected: int) -> None:
        super().__init__(f"label was changed meanwhile: current version {current}, your version {expected}")
        self.current = current
        self.expected = expected


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_definitions(n: int = 3) -> list[dict]:
    """Labels 1..n named 'label N' in the overlay palette's colours."""
    out = []
    for v in range(1, n + 1):
        r, g, b = (int(c) for c in PALETTE[(v - 1) % len(PALETTE)])
        out.append({"value": v, "name": f"label {v}", "color": f"#{r:02x}{g:02x}{b:02x}"})
    return out


class LabelRecord(dict):
    """The sidecar content of one image (a dict; see the module docstring)."""

    @property
    def version(self) -> int:
        return int(self.get("version", 0))


class LabelStore:
    """Versioned label maps of one datastore (see the module docstring).

    Args:
        labels_dir: ``DATA/.medsam/labels``.
        data_root: the resolved data folder (paths in sidecars are relative to it).
    """

    def __init__(self, labels_dir: Path, data_root: Path) -> None:
        self.dir = Path(labels_dir)
        self.root = Path(data_root)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._maps: dict[str, tuple[int, np.ndarray]] = {}  # id -> (version, label map), small cache
        self._maps_guard = threading.Lock()

    # ------------------------------------------------------------------ names
    @staticmethod
    def label_format(image: MedicalImage) -> str:
        """``"png"`` for plain 2D pictures, else ``"nifti"``."""
        plain = image.source_format in _PLAIN_2D_FORMATS and not image.is_volume and image.geometry_ndim == 2
        return "png" if plain else "nifti"

    def label_path(self, image_id: str, fmt: str) -> Path:
        """``labels/ID.nii.gz`` or ``labels/ID.png``: the suffix always appended (see the module)."""
        return self.dir / (image_id + (".png" if fmt == "png" else ".nii.gz"))

    @staticmethod
    def sidecar_path(label_path: Path) -> Path:
        return label_path.with_name(label_path.name + ".json")

    def _sidecar_for(self, image_id: str) -> Path | None:
        for fmt in ("nifti", "png"):
            p = self.sidecar_path(self.label_path(image_id, fmt))
            if p.is_file():
                return p
        return None

    # ------------------------------------------------------------------ reading
    def record(self, image_id: str) -> LabelRecord:
        """The sidecar of ``image_id`` (version 0 and no history when nothing was saved)."""
        p = self._sidecar_for(image_id)
        if p is None:
            return LabelRecord(version=0, image_id=image_id, labels=default_definitions(), history=[])
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"label sidecar of {image_id!r} is unreadable: {exc}") from None
        if data.get("image_id") != image_id:
            raise RuntimeError(f"label sidecar {p.name} belongs to image {data.get('image_id')!r}, not {image_id!r}")
        return LabelRecord(data)

    def version(self, image_id: str) -> int:
        return self.record(image_id).version

    def read(self, image_id: str, like: MedicalImage) -> tuple[int, np.ndarray]:
        """``(version, label map)``; the map has ``like.spatial_shape`` (zeros when unsaved)."""
        rec = self.record(image_id)
        v = rec.version
        with self._maps_guard:
            hit = self._maps.get(image_id)
            if hit is not None and hit[0] == v:
                return v, hit[1]
        if v == 0 or not rec.get("label_file"):
            labels = np.zeros(like.spatial_shape, dtype=np.uint8)
        else:
            path = self.dir / rec["label_file"]
            labels = np.asarray(read_image(path).array)
            if labels.shape != like.spatial_shape:
                raise RuntimeError(f"label file {path.name} has shape {labels.shape}, image {like.spatial_shape}")
            labels = labels.astype(np.uint8, copy=False)
        labels.setflags(write=False)
        with self._maps_guard:
            self._maps[image_id] = (v, labels)
            if len(self._maps) > 8:
                self._maps.pop(next(iter(self._maps)))
        return v, labels

    # ------------------------------------------------------------------ writing
    @contextmanager
    def locked(self, image_id: str) -> Iterator[None]:
        """Serialise writers of one image (threads, and processes where ``flock`` exists)."""
        with self._locks_guard:
            lock = self._locks.setdefault(image_id, threading.Lock())
        with lock, self._file_lock(hashlib.sha256(image_id.encode()).hexdigest()[:32] + ".lock"):
            yield

    @contextmanager
    def _file_lock(self, name: str) -> Iterator[None]:
        """An exclusive ``flock`` on ``locks/<name>`` beside the labels (none on Windows)."""
        lock_dir = self.dir.parent / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / name, "a+b") as fh:
            try:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            except ImportError:  # Windows: the thread lock alone
                pass
            yield

    def save(
        self,
        image_id: str,
        like: MedicalImage,
        labels: np.ndarray,
        expected_version: int,
        event: dict,
        definitions: list[dict] | None = None,
        model: dict | None = None,
    ) -> LabelRecord:
        """Write ``labels`` (the whole map) as version ``expected_version + 1``.

        Raises :class:`VersionConflict` when the stored version is not ``expected_version``.
        ``event`` (action, slice, prompts, edits ...) is appended to the history with the version,
        time and ``model``.
        """
        with self.locked(image_id):
            rec = self.record(image_id)
            if rec.version != int(expected_version):
                raise VersionConflict(rec.version, int(expected_version))
            return self._write(image_id, like, labels, rec, event, definitions, model)

    def update(
        self,
        image_id: str,
        like: MedicalImage,
        expected_version: int,
        change,
        event: dict,
        definitions: list[dict] | None = None,
        model: dict | None = None,
    ) -> LabelRecord:
        """Read-modify-write under the lock: ``change(current_map) -> new_map`` (a copy)."""
        with self.locked(image_id):
            rec = self.record(image_id)
            if rec.version != int(expected_version):
                raise VersionConflict(rec.version, int(expected_version))
            _, current = self.read(image_id, like)
            new = change(np.array(current, copy=True))
            return self._write(image_id, like, new, rec, event, definitions, model)

    def _write(self, image_id, like, labels, rec, event, definitions, model) -> LabelRecord:
        labels = np.asarray(labels)
        if labels.shape != like.spatial_shape:
            raise ValueError(f"label map shape {labels.shape} does not match the image's {like.spatial_shape}")
        labels = labels.astype(np.uint8, copy=False)
        fmt = self.label_format(like)
        path = self.label_path(image_id, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mask(labels, like, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        time = now_iso()
        version = rec.version + 1
        history = list(rec.get("history", []))
        history.append({"version": version, "time": time, **event, "model": model})
        new = LabelRecord(
            format=SIDECAR_FORMAT,
            image_id=image_id,
            version=version,
            created=rec.get("created") or time,
            updated=time,
            label_file=path.relative_to(self.dir).as_posix(),
            label_format=fmt,
            label_sha256=digest,
            labels=definitions if definitions is not None else rec.get("labels") or default_definitions(),
            model=model,
            history=history[-_MAX_HISTORY:],
        )
        sidecar = self.sidecar_path(path)
        write_json(sidecar, new)
        frozen = np.array(labels, copy=True)
        frozen.setflags(write=False)
        with self._maps_guard:
            self._maps[image_id] = (version, frozen)
        return new

    # ------------------------------------------------------------------ layout
    def migrate(self) -> int:
        """Bring the label folder to :data:`LAYOUT_VERSION`; returns the number of files moved.

        Each sidecar says which image its label file belongs to; a file whose place under the
        current layout differs is moved there with its sidecar (sidecar written first, then the
        label file moved, then the old sidecar removed), longest names first so that no move
        lands on a file that has yet to move. A run cut short is completed by the next call:
        ``layout.json`` is written last. Serialised across processes by a lock file.
        """
        marker = self.dir / LAYOUT_FILE
        if _layout_version(marker) >= LAYOUT_VERSION:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        moved = 0
        with self._layout_lock():
            if _layout_version(marker) >= LAYOUT_VERSION:
                return 0
            sidecars = sorted(
                (p for p in self.dir.rglob("*.json") if p != marker and p.is_file()),
                key=lambda p: (-len(p.as_posix()), p.as_posix()),
            )
            for old_sidecar in sidecars:
                moved += self._move_to_layout(old_sidecar)
            write_json(marker, {"layout": LAYOUT_VERSION})
        return moved

    def _move_to_layout(self, old_sidecar: Path) -> int:
        try:
            rec = json.loads(old_sidecar.read_text())
            image_id, label_file, fmt = rec["image_id"], rec["label_file"], rec["label_format"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # not a sidecar of ours: left alone
        new_path = self.label_path(image_id, fmt)
        new_sidecar = self.sidecar_path(new_path)
        if new_sidecar == old_sidecar:
            return 0
        old_path = self.dir / label_file
        if old_path.is_file():
            new_path.parent.mkdir(parents=True, exist_ok=True)
            rec["label_file"] = new_path.relative_to(self.dir).as_posix()
            write_json(new_sidecar, rec)
            os.replace(old_path, new_path)
        elif not (new_sidecar.is_file() and new_path.is_file()):
            return 0  # a sidecar without its label file, and nothing moved: left for a person
        old_sidecar.unlink(missing_ok=True)
        return 1

    @contextmanager
    def _layout_lock(self) -> Iterator[None]:
        with self._locks_guard, self._file_lock("layout.lock"):
            yield

    def label_file(self, image_id: str) -> Path | None:
        rec = self.record(image_id)
        return (self.dir / rec["label_file"]) if rec.get("label_file") else None

    def status(self, image_id: str) -> tuple[str, int]:
        """``("labelled" | "unlabelled", version)`` without reading the label map."""
        try:
            v = self.version(image_id)
        except RuntimeError:
            return "unlabelled", 0
        return ("labelled" if v > 0 else "unlabelled"), v

    def rel_to_data(self, path: Path) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")
