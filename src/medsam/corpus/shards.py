"""A corpus packed into shards a training job streams: whole cases per uncompressed tar file.

``medsam shard CORPUS -o SHARDS`` writes (:func:`write_shards`)::

    SHARDS/corpus.json, manifest.csv, manifest.parquet, summary.csv, errors.csv   copied from CORPUS
    SHARDS/shards.json               the merged index: {"format": "medsam-shards", "version": 1,
                                     "shards": [{"name", "sha256", "bytes", "samples", "cases"}, ...]}
    SHARDS/shards/000000.tar         members "<dataset>/<case>/slices/<slice:04d>.npz": the corpus's
                                     slice files, bytes unchanged (WebDataset layout: one sample per
                                     key, uncompressed, mtime 0, so a shard is the same bytes
                                     whenever it is written from the same cases)
    SHARDS/shards/000000.tar.json    the shard's record: name, sha256, bytes, samples, its cases with
                                     the SHA-256 of each case.json, and every member's data offset
                                     and size

A shard is written to a temporary name, then its record; a shard with its record is finished.
The merged index is built from the records alone, so adding cases to the corpus and running
``medsam shard`` again writes new shards for the new cases, rewrites only the shards whose cases
changed (their case.json differs), and reads no other shard. Shards are written in parallel on a
:class:`medsam.cluster.DaskEngine` with ``--dask``.

Reading: :func:`medsam.corpus.load_slice` on a folder with ``shards.json`` reads a slice file from
its shard by offset (one ``pread``), so every reader of a corpus (training, the embedding store,
scoring) reads a shard folder as it reads the corpus. :func:`shard_rows` gives a training rank
the rows of its own shards only.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.atomic import write_json
from ..io.checksum import sha256_file
from .schema import CorpusError, read_json

__all__ = [
    "SHARDS_FORMAT",
    "ShardReport",
    "ShardedCorpus",
    "is_sharded",
    "shard_rows",
    "verify_shards",
    "write_shards",
]

SHARDS_FORMAT = "medsam-shards"
SHARDS_VERSION = 1
INDEX = "shards.json"
_COPIED = ("corpus.json", "manifest.csv", "manifest.parquet", "summary.csv", "errors.csv")


def is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / INDEX).is_file()


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class _ShardTask:
    corpus: str
    out: str
    name: str
    cases: tuple[tuple[str, str, str], ...]  # (dataset, case, sha256 of case.json)


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    """Pack the slice files of ``task.cases`` into ``shards/<name>.tar``; returns its record."""
    corpus, shard_dir = Path(task.corpus), Path(task.out) / "shards"
    final = shard_dir / f"{task.name}.tar"
    tmp = shard_dir / f".{task.name}.tar.tmp-{os.getpid()}"
    members: dict[str, list[int]] = {}
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for dataset, case, _digest in task.cases:
                slices = corpus / "cases" / dataset / case / "slices"
                for f in sorted(slices.glob("*.npz")):
                    rel = f"cases/{dataset}/{case}/slices/{f.name}"
                    data = f.read_bytes()
                    info = tarfile.TarInfo(rel)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    members[rel] = [tar.offset - padded, len(data)]  # the data ends the archive so far
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "name": task.name,
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size,
        "samples": len(members),
        "cases": [list(c) for c in task.cases],
        "members": members,
    }
    write_json(shard_dir / f"{task.name}.tar.json", record)
    return {k: v for k, v in record.items() if k != "members"}


def _finished_cases(corpus: Path) -> list[tuple[str, str, str]]:
    """(dataset, case, SHA-256 of case.json) of every finished case, sorted."""
    out = []
    cases = corpus / "cases"
    for ds in sorted(p for p in cases.iterdir() if p.is_dir() and not p.name.startswith(".")) if cases.is_dir() else []:
        for c in sorted(p for p in ds.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (c / "case.json").is_file():
                out.append((ds.name, c.name, hashlib.sha256((c / "case.json").read_bytes()).hexdigest()))
    return out


def _slice_count(corpus: Path, dataset: str, case: str) -> int:
    return sum(1 for _ in (corpus / "cases" / dataset / case / "slices").glob("*.npz"))


@dataclass
class ShardReport:
    """What :func:`write_shards` did."""

    out_dir: Path
    written: list[str]
    kept: list[str]
    removed: list[str]
    shards: int
    samples: int
    failed: list[tuple[str, str]]

    def summary(self) -> str:
        return (
            f"shard: {len(self.written)} shard(s) written, {len(self.kept)} kept, {len(self.removed)} removed; "
            f"{self.shards} shards, {self.samples} samples in {self.out_dir}"
            + (f"; {len(self.failed)} failed (rerun to resume)" if self.failed else "")
        )


def write_shards(
    corpus: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    workers: int = 1,
    engine: str = "local",
    scheduler: str | None = None,
) -> ShardReport:
    """Pack the corpus ``corpus`` into shards under ``out_dir`` (see the module docstring).

    Whole cases go into one shard, in (dataset, case) order, a shard closed once it holds at least
    ``samples_per_shard`` slice files. Shards already in ``out_dir`` whose cases are unchanged are
    kept; cases in no kept shard are packed into new shards. ``engine``: ``"local"`` (this process)
    or ``"dask"`` (one task per shard; ``workers`` local processes or the cluster of ``scheduler``).
    """
    src, out = Path(corpus), Path(out_dir)
    if not (src / "corpus.json").is_file():
        raise CorpusError(f"not a corpus folder (no corpus.json): {src}")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if scheduler:
        engine = "dask"
    if out.resolve() == src.resolve():
        raise ValueError("write the shards to another folder than the corpus")
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for leftover in shard_dir.glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)

    cases = _finished_cases(src)
    current = {(d, c): h for d, c, h in cases}
    kept: list[str] = []
    removed: list[str] = []
    taken: set[tuple[str, str]] = set()
    for rec_path in sorted(shard_dir.glob("*.tar.json")):
        rec = read_json(rec_path)
        tar = rec_path.with_suffix("")
        ok = (
            rec is not None
            and tar.is_file()
            and all(current.get((d, c)) == h for d, c, h in rec.get("cases", []))
            and tar.stat().st_size == rec.get("bytes")
        )
        if ok and rec is not None:
            kept.append(rec_path.name[: -len(".tar.json")])
            taken.update((d, c) for d, c, _ in rec["cases"])
        else:
            removed.append(rec_path.name[: -len(".tar.json")])
            rec_path.unlink(missing_ok=True)
            tar.unlink(missing_ok=True)
    for orphan in shard_dir.glob("*.tar"):  # a shard whose record was never written
        if not orphan.with_name(orphan.name + ".json").is_file():
            orphan.unlink(missing_ok=True)

    names = {int(n) for n in kept if n.isdigit()}
    next_number = max(names, default=-1) + 1
    tasks, group, count = [], [], 0
    for d, c, h in cases:
        if (d, c) in taken:
            continue
        group.append((d, c, h))
        count += _slice_count(src, d, c)
        if count >= samples_per_shard:
            tasks.append(_ShardTask(str(src), str(out), f"{next_number:06d}", tuple(group)))
            next_number, group, count = next_number + 1, [], 0
    if group:
        tasks.append(_ShardTask(str(src), str(out), f"{next_number:06d}", tuple(group)))

    written, failed = [], []
    if engine == "dask":
        from ..cluster import DaskEngine

        with DaskEngine(workers=workers, scheduler=scheduler) as dask:
            for task, _rec, error in dask.map(_write_shard, tasks, name="shard"):
                if error is None:
                    written.append(task.name)
                else:
                    failed.append((task.name, f"{type(error).__name__}: {error}"))
    elif engine == "local":
        for task in tasks:
            _write_shard(task)
            written.append(task.name)
    else:
        raise ValueError(f"engine must be 'local' or 'dask', got {engine!r}")

    for name in _COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / f".{name}.tmp")
            os.replace(out / f".{name}.tmp", out / name)
    index = build_shard_index(out)
    return ShardReport(
        out_dir=out,
        written=sorted(written),
        kept=kept,
        removed=removed,
        shards=len(index["shards"]),
        samples=sum(s["samples"] for s in index["shards"]),
        failed=failed,
    )


def build_shard_index(out_dir: str | Path) -> dict[str, Any]:
    """Merge the records of the finished shards of ``out_dir`` into ``shards.json`` (reads the
    records only)."""
    out = Path(out_dir)
    shards = []
    for rec_path in sorted((out / "shards").glob("*.tar.json")):
        rec = read_json(rec_path)
        if rec is not None and rec_path.with_suffix("").is_file():
            shards.append({k: rec[k] for k in ("name", "sha256", "bytes", "samples", "cases")})
    index = {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "shards": shards}
    write_json(out / INDEX, index)
    return index


def verify_shards(out_dir: str | Path) -> list[str]:
    """Names of the shards whose file no longer has the SHA-256 the index records."""
    out = Path(out_dir)
    index = read_json(out / INDEX) or {}
    shards = _checked_shards(index.get("shards"), out / INDEX)
    return [s["name"] for s in shards if sha256_file(out / "shards" / f"{s['name']}.tar") != s["sha256"]]


# --------------------------------------------------------------------------- reading
class ShardedCorpus:
    """Random access to the slice files of a shard folder, by their corpus-relative path. A
    shard's record (its member table) is read when one of its files is first asked for, so a
    training rank holds the tables of its own shards only.

    Args:
        folder: the shard folder (with ``shards.json``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = read_json(self.folder / INDEX)
        if index is None or index.get("format") != SHARDS_FORMAT:
            raise CorpusError(f"not a shard folder (no readable {INDEX}): {folder}")
        self.shards: list[dict[str, Any]] = _checked_shards(index.get("shards"), self.folder / INDEX)
        self._shard_of = {(d, c): k for k, s in enumerate(self.shards) for d, c, _h in s["cases"]}
        self._members: dict[int, dict[str, list[int]]] = {}
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _shard(self, rel: str) -> int:
        parts = rel.split("/")
        k = self._shard_of.get((parts[1], parts[2])) if len(parts) >= 5 and parts[0] == "cases" else None
        if k is None:
            raise CorpusError(f"slice file {rel} is in no shard of {self.folder}")
        return k

    def _record(self, k: int) -> dict[str, list[int]]:
        known = self._members.get(k)
        if known is not None:
            return known
        name = self.shards[k]["name"]
        rec = read_json(self.folder / "shards" / f"{name}.tar.json")
        if rec is None or rec.get("sha256") != self.shards[k]["sha256"]:
            raise CorpusError(f"shard {name}: its record is missing or does not match {INDEX}")
        members = rec.get("members")
        if not (
            isinstance(members, dict)
            and all(
                isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 0 for x in v)
                for v in members.values()
            )
        ):
            raise CorpusError(f"shard {name}: its record's member table is malformed")
        self._members[k] = members
        return members

    def identity(self, rel: str) -> str:
        """``size|shard sha256`` of the slice file ``rel``."""
        k = self._shard(rel)
        with self._lock:
            try:
                _offset, size = self._record(k)[rel]
            except KeyError:
                raise CorpusError(f"slice file {rel} is not in shard {self.shards[k]['name']}") from None
        return f"{size}|{self.shards[k]['sha256']}"

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the slice file ``rel`` (``cases/<dataset>/<case>/slices/NNNN.npz``)."""
        k = self._shard(rel)
        path = self.folder / "shards" / f"{self.shards[k]['name']}.tar"
        with self._lock:
            if self._pid != os.getpid():  # a forked DataLoader worker: its own descriptors
                self._fds, self._pid = {}, os.getpid()
            try:
                offset, size = self._record(k)[rel]
            except KeyError:
                raise CorpusError(f"slice file {rel} is not in shard {self.shards[k]['name']}") from None
            fd = self._fds.get(k)
            if fd is None:
                try:
                    fd = self._fds[k] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CorpusError(f"shard {path} cannot be opened: {exc}") from None
        data = os.pread(fd, int(size), int(offset))
        if len(data) != size:
            raise CorpusError(f"shard {path} is shorter than its record says")
        return data


def _checked_shards(shards: Any, where: Path) -> list[dict[str, Any]]:
    """The shard entries of an index, each with a plain file name, a checksum and its cases as
    (dataset, case, case.json SHA-256) strings; CorpusError otherwise."""
    bad = CorpusError(f"{where}: malformed shard list")
    if not isinstance(shards, list):
        raise bad
    for s in shards:
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and s["name"].isalnum()
            and isinstance(s.get("sha256"), str)
            and isinstance(s.get("cases"), list)
            and all(isinstance(c, list) and len(c) == 3 and all(isinstance(x, str) for x in c) for c in s["cases"])
        )
        if not ok:
            raise bad
    return shards


_OPEN: dict[tuple[str, int], ShardedCorpus] = {}


def sharded_corpus(folder: Path) -> ShardedCorpus | None:
    """The :class:`ShardedCorpus` of ``folder`` (opened once per process), None for a plain corpus."""
    key = (str(folder), os.getpid())
    found = _OPEN.get(key)
    if found is None and is_sharded(folder):
        found = _OPEN[key] = ShardedCorpus(folder)
    return found


def shard_rows(folder: str | Path, rows: Sequence[Any], rank: int, world_size: int) -> tuple[list[Any], int]:
    """The rows of ``rows`` in the shards of ``rank`` (shard k belongs to rank k mod
    ``world_size``), and the largest such count over all ranks (each rank's epoch is padded to it,
    so that every rank makes the same number of steps)."""
    index = read_json(Path(folder) / INDEX) or {}
    owner = {}
    for k, s in enumerate(_checked_shards(index.get("shards"), Path(folder) / INDEX)):
        for d, c, _h in s["cases"]:
            owner[(d, c)] = k % world_size
    counts = [0] * world_size
    mine = []
    for r in rows:
        o = owner.get((r.dataset, r.case))
        if o is None:
            raise CorpusError(f"case {r.dataset}/{r.case} is in the manifest but in no shard")
        counts[o] += 1
        if o == rank:
            mine.append(r)
    return mine, max(counts)
