"""Folders in one run: ``medsam segment DIR --prompts PROMPTS -o OUTDIR``.

The model is loaded once and every case of the folder goes through :func:`medsam.segment.segment_file`
with it. A case that fails (unreadable file, bad prompt) is reported and the rest finish; a case
whose outputs already exist is skipped, so an interrupted run resumes where it stopped. After each
case ``OUTDIR/summary.csv`` is rewritten (atomically): one row per case with its status
(``done``, ``skipped``, ``failed``), object count, seconds, output and error.

Prompts file (JSON or CSV, chosen by the suffix):

* JSON: an object mapping an image's path (relative to DIR: a file, or a DICOM series folder) to
  ``"auto"``, to ``{"boxes": [[x0, y0, x1, y1], ...], "slice": K}`` (2D boxes; ``slice`` for a
  volume's key slice) or ``{"boxes": [[x0, y0, z0, x1, y1, z1], ...]}``, or to ``{}`` for an
  ``.npz`` case that carries its own boxes. The key ``"*"`` with the value ``"auto"`` adds every
  other image file of DIR (and every ``.npz`` case, with its own boxes).
* CSV: a header ``image,box,slice``; one row per object; ``box`` holds 4 or 6 numbers separated by
  spaces, or ``auto``; ``slice`` may be empty. Rows of one image are one case.

Outputs keep the image's relative path: ``OUTDIR/<path>.png`` for PNG, JPEG and BMP images,
``<path>.tif`` for TIFF (which may hold a volume), ``<path>.nii.gz`` for volumes and DICOM,
``<path>.npz`` for ``.npz`` cases, each with its ``.scores.json``. Two cases that would write the
same output (``a.png`` and ``a.jpg``), or an output folder that is the input folder, stop the run
before the model loads.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .io.atomic import write_csv
from .io.formats import format_of, image_suffix
from .segment_io import SegmentOptions

__all__ = ["CasePrompts", "CaseResult", "PromptsError", "case_output", "every_file", "read_prompts", "segment_folder"]

SUMMARY_COLUMNS = ("image", "status", "objects", "seconds", "mask", "error")
_TWO_D = ("png", "jpeg", "bmp")


@dataclass(frozen=True)
class CasePrompts:
    """What to do with one image of the folder: ``boxes`` (4 or 6 numbers each) with an optional
    ``key_slice``, or ``auto``; neither means an ``.npz`` case's own boxes."""

    image: str
    boxes: tuple[tuple[float, ...], ...] = ()
    key_slice: int | None = None
    auto: bool = False


@dataclass
class CaseResult:
    """One row of the summary."""

    image: str
    status: str
    objects: int = 0
    seconds: float = 0.0
    mask: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


class PromptsError(ValueError):
    """The prompts file cannot be used (the whole run stops before the model loads)."""


# ----------------------------------------------------------------------------- the prompts file
def read_prompts(path: str | Path, folder: str | Path) -> list[CasePrompts]:
    """The cases of ``folder`` that ``path`` (JSON or CSV, see the module) asks for, in file order
    (JSON ``"*"`` cases sorted by name after the listed ones). Raises PromptsError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsError(f"cannot read the prompts file {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        cases = _from_json(text, path)
    elif path.suffix.lower() == ".csv":
        cases = _from_csv(text, path)
    else:
        raise PromptsError(f"{path.name}: the prompts file must be .json or .csv")
    return _with_wildcard(cases, Path(folder))


def _from_json(text: str, path: Path) -> list[CasePrompts | str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptsError(f"{path.name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PromptsError(f"{path.name}: expected an object mapping images to prompts")
    cases: list[CasePrompts | str] = []
    for image, spec in data.items():
        if image == "*":
            if spec != "auto":
                raise PromptsError(f'{path.name}: "*" may only map to "auto", got {spec!r}')
            cases.append("*")
            continue
        where = f"{path.name}[{image!r}]"
        if spec == "auto":
            cases.append(CasePrompts(_relative(image, where), auto=True))
            continue
        if not isinstance(spec, dict) or set(spec) - {"boxes", "slice", "auto"}:
            raise PromptsError(f'{where}: expected "auto" or an object with "boxes" (and "slice")')
        key = spec.get("slice")
        if key is not None and (not isinstance(key, int) or isinstance(key, bool)):
            raise PromptsError(f"{where}: slice must be an integer, got {key!r}")
        if spec.get("auto") is True:
            if "boxes" in spec:
                raise PromptsError(f"{where}: give boxes or auto, not both")
            cases.append(CasePrompts(_relative(image, where), auto=True, key_slice=key))
            continue
        boxes = spec.get("boxes", [])
        if not isinstance(boxes, list) or not all(isinstance(b, list) for b in boxes):
            raise PromptsError(f"{where}: boxes must be a list of [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1]")
        cases.append(CasePrompts(_relative(image, where), tuple(_box(b, where) for b in boxes), key))
    return cases


def _from_csv(text: str, path: Path) -> list[CasePrompts | str]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "image" not in reader.fieldnames or "box" not in reader.fieldnames:
        raise PromptsError(f"{path.name}: the CSV needs a header with the columns image, box (and slice)")
    grouped: dict[str, CasePrompts] = {}
    for line, row in enumerate(reader, start=2):
        where = f"{path.name} line {line}"
        image = _relative(row.get("image") or "", where)
        text_box = (row.get("box") or "").strip()
        key_text = (row.get("slice") or "").strip()
        try:
            key = int(key_text) if key_text else None
        except ValueError:
            raise PromptsError(f"{where}: slice must be an integer, got {key_text!r}") from None
        before = grouped.get(image)
        if text_box.lower() == "auto":
            if before is not None:
                raise PromptsError(f"{where}: {image} is listed twice with auto")
            grouped[image] = CasePrompts(image, auto=True, key_slice=key)
            continue
        try:
            numbers = [float(v) for v in text_box.split()]
        except ValueError:
            raise PromptsError(f"{where}: box must be 4 or 6 numbers or 'auto', got {text_box!r}") from None
        box = _box(numbers, where)
        if before is None:
            grouped[image] = CasePrompts(image, (box,), key)
        elif before.auto:
            raise PromptsError(f"{where}: {image} has both auto and boxes")
        elif before.key_slice != key:
            raise PromptsError(f"{where}: the rows of {image} name different slices")
        else:
            grouped[image] = replace(before, boxes=(*before.boxes, box))
    return list(grouped.values())


def _relative(image: object, where: str) -> str:
    if not isinstance(image, str) or not image.strip():
        raise PromptsError(f"{where}: an image path is required")
    path = Path(image)
    if path.is_absolute() or ".." in path.parts:
        raise PromptsError(f"{where}: image paths are relative to the folder and stay inside it, got {image!r}")
    return path.as_posix()


def _box(values: Iterable[Any], where: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise PromptsError(f"{where}: a box holds numbers, got {values!r}") from None
    if len(box) not in (4, 6) or not all(v == v and abs(v) != float("inf") for v in box):
        raise PromptsError(f"{where}: a box is 4 or 6 finite numbers, got {list(box)}")
    return box


def every_file(folder: str | Path) -> list[CasePrompts]:
    """Every image file of ``folder`` in automatic mode (and every ``.npz`` case with its boxes):
    what ``{"*": "auto"}`` asks for."""
    return _with_wildcard(["*"], Path(folder))


def _with_wildcard(cases: list[CasePrompts | str], folder: Path) -> list[CasePrompts]:
    listed = [c for c in cases if isinstance(c, CasePrompts)]
    seen = {c.image for c in listed}
    if len(seen) != len(listed):
        raise PromptsError("an image is listed twice")
    if "*" not in cases:
        return listed
    extra = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = entry.name
        if name in seen or name.startswith(".") or not entry.is_file():
            continue
        kind = format_of(entry)
        if kind == "npz":
            extra.append(CasePrompts(name))
        elif kind is not None:
            extra.append(CasePrompts(name, auto=True))
    return listed + extra


# ----------------------------------------------------------------------------- outputs
def case_output(out_dir: Path, image: str, folder: Path) -> Path:
    """Where the mask of ``image`` goes: its relative path with the image suffix replaced (see
    the module)."""
    kind = format_of(folder / image)
    relative = Path(image)
    if kind == "npz":
        return out_dir / relative
    suffix = image_suffix(relative.name)
    stem = relative.name[: -len(suffix)] if suffix else relative.name
    new = ".png" if kind in _TWO_D else ".tif" if kind == "tiff" else ".nii.gz"
    return out_dir / relative.parent / (stem + new)


def check_outputs(folder: Path, cases: list[CasePrompts], out_dir: Path) -> list[tuple[CasePrompts, Path]]:
    """Each case with its output; PromptsError when the output folder is the input folder or two
    cases would write one file."""
    if out_dir.resolve() == folder.resolve():
        raise PromptsError(f"the output folder must not be the input folder ({folder}): masks would replace images")
    owner: dict[Path, str] = {}
    todo = []
    for case in cases:
        mask = case_output(out_dir, case.image, folder)
        other = owner.setdefault(mask.resolve(), case.image)
        if other != case.image:
            raise PromptsError(f"{other} and {case.image} would both be written to {mask}: rename one")
        todo.append((case, mask))
    return todo


def _scores_path(mask: Path) -> Path | None:
    if format_of(mask) == "npz":
        return None
    suffix = image_suffix(mask.name) or ""
    return mask.with_name(mask.name[: -len(suffix)] + ".scores.json")


def _done(mask: Path) -> bool:
    scores = _scores_path(mask)
    return mask.is_file() and (scores is None or scores.is_file())


def _write_summary(out_dir: Path, rows: list[CaseResult]) -> None:
    table = [[r.image, r.status, r.objects, round(r.seconds, 2), r.mask, r.error] for r in rows]
    write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, table)


# ----------------------------------------------------------------------------- the run
def segment_folder(
    folder: str | Path,
    cases: list[CasePrompts],
    out_dir: str | Path,
    options: SegmentOptions,
    *,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = False,
) -> list[CaseResult]:
    """Segment every case of ``folder`` into ``out_dir`` with one model (``options.model``, else
    loaded once from ``options.checkpoint``); returns the summary rows (also in summary.csv)."""
    from .segment_io import resolve_model

    folder, out_dir = Path(folder), Path(out_dir)
    todo = check_outputs(folder, cases, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = {mask for _, mask in todo if _done(mask)}  # by an earlier run
    model = options.model
    if len(finished) < len(todo) and model is None:
        model = resolve_model(options, log)
    shared = replace(options, model=model)
    rows: list[CaseResult] = []
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="case", dynamic_ncols=True)
        outer = log

        def log(message: str) -> None:  # lines above the bar, not through it
            with bar.external_write_mode(file=sys.stderr):
                outer(message)

    for case, mask in todo:
        start = time.perf_counter()
        if bar is not None:
            bar.set_postfix_str(case.image[-40:])
        if mask in finished:
            rows.append(CaseResult(case.image, "skipped", mask=str(mask)))
        else:
            rows.append(_one_case(folder, case, mask, shared, log, start))
        if bar is not None:
            bar.update(1)
        _write_summary(out_dir, rows)
    if bar is not None:
        bar.close()
    return rows


def _one_case(
    folder: Path,
    case: CasePrompts,
    mask: Path,
    options: SegmentOptions,
    log: Callable[[str], None],
    start: float,
) -> CaseResult:
    from .automatic import AutoOptions
    from .segment import segment_file

    auto = (options.auto or AutoOptions()) if case.auto else None
    try:
        mask.parent.mkdir(parents=True, exist_ok=True)
        per_case = replace(
            options,
            auto=auto,
            key_slice=case.key_slice,
            overlay_path=None,
            scores_path=None,
            rtstruct_path=None,
            proposals=None,
            specialist=options.specialist if case.auto else None,
        )
        out = segment_file(folder / case.image, mask, [list(b) for b in case.boxes], per_case, log=log)
    except Exception as exc:  # a batch reports the bad case and finishes the rest
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CaseResult(
            case.image, "failed", seconds=time.perf_counter() - start, error=f"{type(exc).__name__}: {message}"
        )
    objects = len(out.extra.get("objects", [])) or len(out.scores) or int(out.labels.max() if out.labels.size else 0)
    return CaseResult(case.image, "done", objects, time.perf_counter() - start, str(mask), extra=out.extra)
