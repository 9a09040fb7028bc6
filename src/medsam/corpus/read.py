"""Reading a corpus: the manifest (Parquet where present and current, else CSV) as a compact
sequence of rows, and the slice files. See :mod:`medsam.corpus` for the layout.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from .schema import INT_COLUMNS, MANIFEST_COLUMNS, CorpusError, ManifestRow


# --------------------------------------------------------------------------- reading
class Manifest(Sequence[ManifestRow]):
    """Rows of a manifest as a read-only sequence of :class:`ManifestRow`, made on access from
    columns (a million rows stay a few compact arrays, not a million Python objects)."""

    def __init__(self, columns: Mapping[str, Sequence[Any]]) -> None:
        self._columns = columns
        self._n = len(columns["dataset"]) if columns else 0

    def __len__(self) -> int:
        return self._n

    def _row(self, i: int) -> ManifestRow:
        c = self._columns
        values: dict[str, Any] = {k: (int(c[k][i]) if k in INT_COLUMNS else str(c[k][i])) for k in MANIFEST_COLUMNS}
        return ManifestRow(**values)

    @overload
    def __getitem__(self, index: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[ManifestRow]: ...

    def __getitem__(self, index: int | slice) -> ManifestRow | list[ManifestRow]:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(self._n))]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._row(index)

    def __iter__(self) -> Iterator[ManifestRow]:
        return (self._row(i) for i in range(self._n))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Manifest, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"Manifest({self._n} rows)"


def _read_parquet(
    path: Path, split: str | None, datasets: Sequence[str], modalities: Sequence[str]
) -> Mapping[str, Sequence[Any]]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(MANIFEST_COLUMNS))
    mask = None
    for name, wanted in (
        ("split", [split] if split is not None else None),
        ("dataset", datasets),
        ("modality", modalities),
    ):
        if wanted:
            cond = pc.is_in(table[name], value_set=__import__("pyarrow").array(list(wanted), type=table[name].type))
            mask = cond if mask is None else pc.and_(mask, cond)
    if mask is not None:
        table = table.filter(mask)
    return {name: table[name].to_numpy(zero_copy_only=False) for name in MANIFEST_COLUMNS}


def _read_csv(
    path: Path, split: str | None, datasets: Sequence[str], modalities: Sequence[str]
) -> Mapping[str, Sequence[Any]]:
    columns: dict[str, list[Any]] = {c: [] for c in MANIFEST_COLUMNS}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(f"{path}: missing columns {', '.join(missing)}")
        for i, raw in enumerate(reader, start=2):
            if split is not None and raw["split"] != split:
                continue
            if datasets and raw["dataset"] not in datasets:
                continue
            if modalities and raw["modality"] not in modalities:
                continue
            try:
                for c in MANIFEST_COLUMNS:
                    columns[c].append(int(float(raw[c])) if c in INT_COLUMNS else (raw[c] or ""))
            except (TypeError, ValueError):
                raise CorpusError(f"{path}, line {i}: a numeric column does not parse: {raw}") from None
    return columns


def read_manifest(
    corpus: str | Path,
    split: str | None = None,
    datasets: Sequence[str] = (),
    modalities: Sequence[str] = (),
) -> Manifest:
    """Rows of the corpus's manifest in file order, optionally of one split / datasets /
    modalities: ``manifest.parquet`` when it exists, pyarrow is installed and the CSV has not been
    changed since, else ``manifest.csv``."""
    root = Path(corpus)
    parquet, text = root / "manifest.parquet", root / "manifest.csv"
    # The Parquet file is written after the CSV; a CSV edited since (by hand) wins.
    if parquet.is_file() and (not text.is_file() or parquet.stat().st_mtime_ns >= text.stat().st_mtime_ns):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            pass
        else:
            try:
                return Manifest(_read_parquet(parquet, split, tuple(datasets), tuple(modalities)))
            except (OSError, KeyError, ValueError) as exc:
                raise CorpusError(f"{parquet}: not a readable manifest ({exc})") from None
    if not text.is_file():
        raise CorpusError(f"no manifest.csv in corpus folder {corpus}")
    return Manifest(_read_csv(text, split, tuple(datasets), tuple(modalities)))


def load_slice(corpus: str | Path, row: ManifestRow | str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(image (H, W[, 3]) uint8, label map (H, W), spacing (row, col) mm) of a manifest row's slice
    (or of a slice file path relative to the corpus); from its shard where ``corpus`` is a shard
    folder (:mod:`medsam.corpus.shards`)."""
    rel = row if isinstance(row, str) else row.path
    path = Path(corpus) / rel
    from .shards import sharded_corpus

    shards = sharded_corpus(Path(corpus))
    source: Any = path if shards is None else io.BytesIO(shards.read_bytes(Path(rel).as_posix()))
    try:
        with np.load(source, allow_pickle=False) as data:
            image, label = data["image"], data["label"]
            spacing = tuple(float(s) for s in data["spacing"]) if "spacing" in data else (1.0, 1.0)
    except FileNotFoundError:
        raise CorpusError(f"slice file missing: {path}") from None
    except (KeyError, ValueError, OSError) as exc:
        raise CorpusError(f"{path}: not a corpus slice ({exc})") from None
    if label.shape != image.shape[:2]:
        raise CorpusError(f"{path}: label {label.shape} and image {image.shape} differ in size")
    if len(spacing) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise CorpusError(f"{path}: bad spacing {spacing}")
    return image, label, (spacing[0], spacing[1])


def slice_identity(corpus: str | Path, rel: str) -> str:
    """What changes when a slice file changes: its size and modification time, or for a shard
    folder the size and the checksum of the shard holding it."""
    from .shards import sharded_corpus

    shards = sharded_corpus(Path(corpus))
    if shards is not None:
        return shards.identity(Path(rel).as_posix())
    st = (Path(corpus) / rel).stat()
    return f"{st.st_size}|{st.st_mtime_ns}"


def group_by_slice(rows: Iterable[ManifestRow]) -> dict[str, list[ManifestRow]]:
    """Manifest rows grouped by slice file (``row.path``), in first-seen order: one image read
    (and one embedding) per slice for all its objects."""
    groups: dict[str, list[ManifestRow]] = {}
    for r in rows:
        groups.setdefault(r.path, []).append(r)
    return groups


def mask_bbox(mask: np.ndarray) -> np.ndarray:
    """Inclusive [x0, y0, x1, y1] (x = column) of the non-zero pixels of a (H, W) mask, float64:
    an object's box as the manifest records it. CorpusError when the mask is empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        raise CorpusError("the object's mask is empty on its slice")
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], dtype=np.float64)
