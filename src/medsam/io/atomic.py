"""Atomic file output: write into a private temp folder beside the target, then ``os.replace``."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output"]


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
