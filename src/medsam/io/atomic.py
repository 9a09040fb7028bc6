"""Atomic file output: write into a private temp folder beside the target, then ``os.replace``.

:func:`atomic_output` is the mechanism; :func:`write_bytes`, :func:`write_text`,
:func:`write_json` and :func:`write_csv` are the package's one way of writing those files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_output", "write_bytes", "write_csv", "write_json", "write_text"]


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path with the same file name as ``path``, then move it into place.

    The temporary path lives in a fresh hidden folder inside ``path``'s folder
    (same file system, so ``os.replace`` is atomic), and keeps the final file
    name so that writers choosing the format from the suffix, or writing a
    header/data pair (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw.gz``), behave as
    for the final path. On success every file written there is moved next to
    ``path`` (data files first, the file named ``path`` last); on failure
    nothing is moved and the temporary folder is removed.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        target = tmpdir / path.name
        yield target
        if not target.exists():
            raise RuntimeError(f"writer produced no file for {path}")
        extras = sorted(p for p in tmpdir.iterdir() if p.name != path.name)
        for p in extras:
            os.replace(p, parent / p.name)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON (and a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def write_csv(
    path: str | Path,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any] | Mapping[str, Any]],
    float_format: str | None = None,
) -> Path:
    """Write a CSV with a header row to ``path`` atomically.

    ``rows`` are sequences in column order, or mappings read by column name (a missing key or
    ``None`` is an empty cell). Floats are written with full precision (``repr``) unless
    ``float_format`` (e.g. ``"{:.6g}"``) is given.
    """

    def cell(value: Any) -> Any:
        if value is None:
            return ""
        if float_format is not None and isinstance(value, float):
            return float_format.format(value)
        return value

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
            writer.writerow([cell(v) for v in values])
    return path
