"""The corpus's schema: format names, manifest columns, row and error records, and paths.

See :mod:`medsam.corpus` for the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CORPUS_FORMAT = "medsam-corpus"
CORPUS_VERSION = 1
CASE_FORMAT = "medsam-corpus-case"
SPLITS = ("train", "val", "test")

MANIFEST_COLUMNS = (
    "dataset",
    "case",
    "slice",
    "label",
    "label_name",
    "modality",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "split",
    "path",
    "height",
    "width",
)
INT_COLUMNS = frozenset({"slice", "label", "x0", "y0", "x1", "y1", "area", "height", "width"})
SUMMARY_COLUMNS = (
    "dataset",
    "modality",
    "label",
    "label_name",
    "label_source",
    "cases",
    "slices",
    "objects",
    "voxels",
    "cases_train",
    "cases_val",
    "cases_test",
)
ERROR_COLUMNS = ("dataset", "case", "stage", "error", "image", "label")


class CorpusError(ValueError):
    """A corpus that does not have the expected layout; the message says what is wrong."""


@dataclass
class CaseError:
    """A case that could not be curated (or an image/label without its partner)."""

    dataset: str
    case: str
    stage: str
    error: str
    image: str = ""
    label: str = ""


@dataclass(frozen=True)
class ManifestRow:
    """One (slice, object) row of the manifest. The box is inclusive, in pixels, x = column."""

    dataset: str
    case: str
    slice: int
    label: int
    label_name: str
    modality: str
    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    split: str
    path: str
    height: int
    width: int


assert tuple(f.name for f in fields(ManifestRow)) == MANIFEST_COLUMNS


# --------------------------------------------------------------------------- paths and records
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content, or None when it is missing, unreadable or not an object."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def case_dir(out: Path, dataset: str, case: str) -> Path:
    """``OUT/cases/<dataset>/<case>``."""
    return Path(out) / "cases" / dataset / case


def error_file(out: Path, dataset: str, case: str) -> Path:
    """``OUT/errors/<dataset>/<case>.json``."""
    return Path(out) / "errors" / dataset / f"{case}.json"


def finished_case(out: Path, dataset: str, case: str) -> dict[str, Any] | None:
    """The ``case.json`` of a finished case, or None."""
    rec = read_json(case_dir(out, dataset, case) / "case.json")
    if rec and rec.get("status") == "done" and rec.get("format") == CASE_FORMAT:
        return rec
    return None
