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

Records. The current version, label definitions, model and the history of every image live in
the workbench's state database (:mod:`medsam.server.state_db`: ``label_heads`` and one
``label_versions`` row per version); the sidecar is written from it at every save, so a labels
folder copied elsewhere keeps its provenance. A datastore written before the database existed is
imported from its sidecars once (:meth:`LabelStore.import_sidecars`).

Versions and concurrency. ``version`` starts at 0 (nothing saved) and grows by one per save.
Every write names the version it was based on (HTTP ``If-Match``); a write based on an older
version raises :class:`VersionConflict` (409) and changes nothing. Writes of one image run in one
database transaction that no other writer of that image, in any server process, runs beside
(:meth:`StateDatabase.write_image`): the version is checked, the rows written, the label file
and sidecar replaced (each staged, then ``os.replace``), then the transaction committed; if the
commit fails, both files are put back as they were. A reader may meet the new label file
during that commit, with the previous version number.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..io import MedicalImage, read_image, write_mask
from ..io.atomic import write_json
from ..overlay import PALETTE
from .state_db import StateDatabase, default_url

__all__ = ["LabelRecord", "LabelStore", "VersionConflict", "default_definitions", "now_iso"]

SIDECAR_FORMAT = 1
LAYOUT_VERSION = 2
LAYOUT_FILE = "layout.json"
_PLAIN_2D_FORMATS = {"png", "jpeg", "bmp", "tiff"}
_MAX_HISTORY = 5000
_SIDECARS_IMPORTED = "sidecars_imported"


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


def _history_entry(row: Mapping) -> dict:
    """One history entry from a ``label_versions`` row: version, time, the event's keys, model."""
    event = row["event"] if isinstance(row["event"], dict) else {}
    return {"version": int(row["version"]), "time": row["time"], **event, "model": row["model"]}


def _record(head: Mapping, history: list[dict]) -> LabelRecord:
    return LabelRecord(
        format=SIDECAR_FORMAT,
        image_id=head["image_id"],
        version=int(head["version"]),
        created=head["created"],
        updated=head["updated"],
        label_file=head["label_file"],
        label_format=head["label_format"],
        label_sha256=head["label_sha256"],
        labels=head["labels"],
        model=head["model"],
        history=history,
    )


def _readable_sidecar(path: Path, labels_dir: Path) -> dict | None:
    """A sidecar's content if it is one of ours and its label file exists, else None."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(rec, dict)
        and isinstance(rec.get("image_id"), str)
        and isinstance(rec.get("label_file"), str)
        and rec.get("label_format") in ("png", "nifti")
        and isinstance(rec.get("version"), int)
        and rec["version"] > 0
    )
    return rec if ok and (labels_dir / rec["label_file"]).is_file() else None


def _importable_history(rec: dict) -> list[dict]:
    """``label_versions`` rows from a sidecar's history: entries with a distinct version in
    ``1..rec["version"]``; the rest is dropped."""
    rows: dict[int, dict] = {}
    for entry in rec.get("history") or []:
        v = entry.get("version") if isinstance(entry, dict) else None
        if isinstance(v, int) and 0 < v <= rec["version"] and v not in rows:
            event = {k: x for k, x in entry.items() if k not in ("version", "time", "model")}
            model = entry.get("model") if isinstance(entry.get("model"), dict) else None
            rows[v] = {
                "version": v,
                "time": str(entry.get("time") or ""),
                "label_sha256": None,
                "event": event,
                "model": model,
            }
    return [rows[v] for v in sorted(rows)]


class _FileSwap:
    """Files replaced inside a transaction, put back as they were if the transaction fails: each
    replaced file's previous content is kept under a hard link until :meth:`discard`."""

    def __init__(self) -> None:
        self._done: list[tuple[Path, Path | None]] = []  # (target, backup or None if it was absent)

    def _backup(self, target: Path) -> None:
        backup = target.with_name(f".old-{os.getpid()}-{threading.get_ident()}-{target.name}")
        backup.unlink(missing_ok=True)
        try:
            os.link(target, backup)
        except FileNotFoundError:
            self._done.append((target, None))
        else:
            self._done.append((target, backup))

    def replace(self, target: Path, source: Path) -> None:
        self._backup(target)
        os.replace(source, target)

    def write_json(self, target: Path, obj: Any) -> None:
        self._backup(target)
        write_json(target, obj)

    def restore(self) -> None:
        for target, backup in reversed(self._done):
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)
        self._done = []

    def discard(self) -> None:
        for _target, backup in self._done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self._done = []


class LabelStore:
    """Versioned label maps of one datastore (see the module docstring).

    Args:
        labels_dir: ``DATA/.medsam/labels``.
        data_root: the resolved data folder (paths in sidecars are relative to it).
        db: the state database (default: SQLite beside ``labels_dir``).
    """

    def __init__(self, labels_dir: Path, data_root: Path, db: StateDatabase | None = None) -> None:
        self.dir = Path(labels_dir)
        self.root = Path(data_root)
        self.db = db if db is not None else StateDatabase(default_url(self.dir.parent))
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
        """The record of ``image_id`` (version 0 and no history when nothing was saved)."""
        from sqlalchemy import select

        db = self.db
        with db.read() as conn:
            head = conn.execute(select(db.heads).where(db.heads.c.image_id == image_id)).mappings().first()
            if head is None:
                return LabelRecord(version=0, image_id=image_id, labels=default_definitions(), history=[])
            rows = conn.execute(
                select(db.versions)
                .where(db.versions.c.image_id == image_id)
                .order_by(db.versions.c.version.desc())
                .limit(_MAX_HISTORY)
            ).mappings()
            history = [_history_entry(r) for r in rows][::-1]
        return _record(head, history)

    def version(self, image_id: str) -> int:
        from sqlalchemy import select

        with self.db.read() as conn:
            v = conn.execute(select(self.db.heads.c.version).where(self.db.heads.c.image_id == image_id)).scalar()
        return int(v or 0)

    def read(self, image_id: str, like: MedicalImage) -> tuple[int, np.ndarray]:
        """``(version, label map)``; the map has ``like.spatial_shape`` (zeros when unsaved)."""
        from sqlalchemy import select

        with self.db.read() as conn:
            head = conn.execute(
                select(self.db.heads.c.version, self.db.heads.c.label_file).where(self.db.heads.c.image_id == image_id)
            ).first()
        v, label_file = (int(head[0]), str(head[1])) if head is not None else (0, "")
        with self._maps_guard:
            hit = self._maps.get(image_id)
            if hit is not None and hit[0] == v:
                return v, hit[1]
        if v == 0:
            labels = np.zeros(like.spatial_shape, dtype=np.uint8)
        else:
            path = self.dir / label_file
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
    def locked(self, image_id: str) -> Iterator[Any]:
        """A write transaction on the state database that no other writer of ``image_id`` (thread
        or process) runs beside (:meth:`StateDatabase.write_image`); yields its connection."""
        with self._locks_guard:
            lock = self._locks.setdefault(image_id, threading.Lock())
        with lock, self.db.write_image(image_id) as conn:
            yield conn

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
        return self._commit(image_id, like, expected_version, lambda: labels, event, definitions, model)

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

        def changed() -> np.ndarray:
            return change(np.array(self.read(image_id, like)[1], copy=True))

        return self._commit(image_id, like, expected_version, changed, event, definitions, model)

    def _commit(self, image_id, like, expected_version, new_map, event, definitions, model) -> LabelRecord:
        """Under the lock: check ``expected_version``, then write ``new_map()`` as the next one."""
        with self.locked(image_id) as conn:
            rec = self._head_record(conn, image_id)
            if rec.version != int(expected_version):
                raise VersionConflict(rec.version, int(expected_version))
            return self._write(conn, image_id, like, new_map(), rec, event, definitions, model)

    def _head_record(self, conn, image_id: str) -> LabelRecord:
        from sqlalchemy import select

        head = conn.execute(select(self.db.heads).where(self.db.heads.c.image_id == image_id)).mappings().first()
        if head is None:
            return LabelRecord(version=0, image_id=image_id, labels=default_definitions(), history=[])
        return _record(head, [])

    def _write(self, conn, image_id, like, labels, rec, event, definitions, model) -> LabelRecord:
        """Inside the transaction ``conn``: the label file, the head and version rows, the sidecar.
        The files are replaced last; if the commit fails they are put back as they were."""
        from sqlalchemy import insert, update

        labels = np.asarray(labels)
        if labels.shape != like.spatial_shape:
            raise ValueError(f"label map shape {labels.shape} does not match the image's {like.spatial_shape}")
        labels = labels.astype(np.uint8, copy=False)
        fmt = self.label_format(like)
        path = self.label_path(image_id, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".new-{os.getpid()}-{threading.get_ident()}-{path.name}")
        write_mask(labels, like, staged)
        try:
            digest = hashlib.sha256(staged.read_bytes()).hexdigest()
            time = now_iso()
            version = rec.version + 1
            row = {
                "version": version,
                "updated": time,
                "label_file": path.relative_to(self.dir).as_posix(),
                "label_format": fmt,
                "label_sha256": digest,
                "labels": definitions if definitions is not None else rec.get("labels") or default_definitions(),
                "model": model,
            }
            heads = self.db.heads
            if rec.version == 0:
                conn.execute(insert(heads).values(image_id=image_id, created=time, **row))
            else:
                conn.execute(update(heads).where(heads.c.image_id == image_id).values(**row))
            conn.execute(
                insert(self.db.versions).values(
                    image_id=image_id, version=version, time=time, label_sha256=digest, event=event, model=model
                )
            )
            sidecar = self._sidecar_of(conn, self._head_record(conn, image_id))
            swap = _FileSwap()
            try:
                swap.replace(path, staged)
                swap.write_json(self.sidecar_path(path), sidecar)
                conn.get_transaction().commit()
            except BaseException:
                swap.restore()
                raise
            swap.discard()
        finally:
            staged.unlink(missing_ok=True)
        frozen = np.array(labels, copy=True)
        frozen.setflags(write=False)
        with self._maps_guard:
            self._maps[image_id] = (version, frozen)
        return LabelRecord(sidecar)

    def _sidecar_of(self, conn, rec: LabelRecord) -> dict:
        """The sidecar content of ``rec`` with its whole stored history (up to the cap)."""
        from sqlalchemy import select

        rows = conn.execute(
            select(self.db.versions)
            .where(self.db.versions.c.image_id == rec["image_id"])
            .order_by(self.db.versions.c.version.desc())
            .limit(_MAX_HISTORY)
        ).mappings()
        return {**rec, "format": SIDECAR_FORMAT, "history": [_history_entry(r) for r in rows][::-1]}

    # ------------------------------------------------------------------ layout
    def migrate(self) -> int:
        """Bring the label folder to :data:`LAYOUT_VERSION` (:meth:`migrate_layout`), then import
        the sidecars of a datastore written before the state database into it, once
        (:meth:`import_sidecars`); returns the number of files moved."""
        moved = self.migrate_layout()
        self.import_sidecars()
        return moved

    def import_sidecars(self) -> int:
        """Import every sidecar whose image has no record in the database yet (the label file
        must exist; its checksum is computed where the sidecar has none); done once per database,
        marked in its ``meta`` table. Returns the number of images imported."""
        from sqlalchemy import insert, select

        db = self.db
        if db.get_meta(_SIDECARS_IMPORTED) is not None:
            return 0
        n = 0
        with db.write_image("\0import sidecars") as conn:
            if conn.execute(select(db.meta.c.value).where(db.meta.c.key == _SIDECARS_IMPORTED)).first():
                return 0
            known = set(conn.execute(select(db.heads.c.image_id)).scalars())
            marker = self.dir / LAYOUT_FILE
            for side in sorted(self.dir.rglob("*.json")) if self.dir.is_dir() else []:
                rec = _readable_sidecar(side, self.dir) if side != marker else None
                if rec is None or rec["image_id"] in known:
                    continue
                label_path = self.dir / rec["label_file"]
                time = now_iso()
                conn.execute(
                    insert(db.heads).values(
                        image_id=rec["image_id"],
                        version=rec["version"],
                        created=str(rec.get("created") or time),
                        updated=str(rec.get("updated") or rec.get("created") or time),
                        label_file=rec["label_file"],
                        label_format=rec["label_format"],
                        label_sha256=str(
                            rec.get("label_sha256") or hashlib.sha256(label_path.read_bytes()).hexdigest()
                        ),
                        labels=rec.get("labels") if isinstance(rec.get("labels"), list) else default_definitions(),
                        model=rec.get("model") if isinstance(rec.get("model"), dict) else None,
                    )
                )
                for entry in _importable_history(rec):
                    conn.execute(insert(db.versions).values(image_id=rec["image_id"], **entry))
                known.add(rec["image_id"])
                n += 1
            db.set_meta(conn, _SIDECARS_IMPORTED, now_iso())
        return n

    def migrate_layout(self) -> int:
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
