"""Dataset specifications for ``medsam prepare``: one typed, validated record per dataset.

A spec is read from YAML. A file holds one dataset (a mapping with ``name``),
a list of datasets, or a mapping ``{datasets: [...]}``. Relative paths are
taken relative to the YAML file's folder. Example::

    name: abdomen_ct              # folder-safe: letters, digits, _ . -
    modality: CT                  # CT, MR, PET, US, XRay, ... (medsam.intensity)
    images: imagesTr              # folder, or a glob such as "raw/*_0000.nii.gz"
    labels: labelsTr
    image_suffix: "_0000"         # stripped from an image's name to give its case id
    label_suffix: ""              # stripped from a label's name to give its case id
    window: soft_tissue           # CT only: a window name or [level, width]
    label_names: {1: liver, 2: kidney}   # or "header" (NIfTI label table of each label file)
    drop_labels: []               # label ids set to background
    keep_labels: null             # if given, every other id is set to background
    slice_axis: 0                 # array axis to slice along; 0 = Z of (Z, Y, X)
    min_component_3d: 1000        # voxels, 26-connectivity (LiteMedSAM: 100)
    min_component_2d: 100         # pixels per slice, 8-connectivity (LiteMedSAM: 10)
    instance_labels: []           # label ids split into connected components (instances)
    split: [0.8, 0.1, 0.1]        # train / val / test fractions, by case
    seed: 0
    split_overrides: {}           # {case id: train|val|test}, fixed before the random split
    label_source: manual          # manual, pseudo, atlas, derived ... (free text)
    label_alignment: strict       # or "reorient": accept a label on the same voxel grid
                                  # stored with flipped/permuted axes

Cases are found by file name. In a folder, every file with a known image
suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``, ``.png``,
``.jpg``, ``.tif``, ``.dcm`` ...) and every sub-folder (a DICOM series) is an
entry; hidden entries (starting with ``.``) are ignored. An entry's case id is
its name without the suffix and without ``image_suffix`` / ``label_suffix``;
an entry whose name does not end with that suffix is not part of the dataset
(so ``case_0001.nii.gz``, a second channel, is ignored under ``_0000``).
Images and labels are matched by case id.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..intensity import Window, canonical_modality, preset_key
from ..io.formats import image_suffix

__all__ = [
    "SPLITS",
    "CaseSource",
    "DatasetSpec",
    "SpecError",
    "assign_splits",
    "case_id_of",
    "load_specs",
    "nifti_label_names",
]

SPLITS = ("train", "val", "test")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_GLOB_CHARS = set("*?[")

_FIELDS = (
    "name",
    "modality",
    "images",
    "labels",
    "image_suffix",
    "label_suffix",
    "window",
    "label_names",
    "drop_labels",
    "keep_labels",
    "slice_axis",
    "min_component_3d",
    "min_component_2d",
    "instance_labels",
    "split",
    "seed",
    "split_overrides",
    "label_source",
    "label_alignment",
    "description",
    "source",
    "license",
)


class SpecError(ValueError):
    """A dataset spec is invalid; the message names the file, the dataset and the field."""


@dataclass(frozen=True)
class CaseSource:
    """One matched (image, label) pair of a dataset."""

    dataset: str
    case: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to curate. Build with :meth:`from_dict` or :func:`load_specs` (validated)."""

    name: str
    modality: str
    images: str
    labels: str
    image_suffix: str = ""
    label_suffix: str = ""
    window: str | tuple[float, float] | None = None
    label_names: dict[int, str] | str = field(default_factory=dict)
    drop_labels: tuple[int, ...] = ()
    keep_labels: tuple[int, ...] | None = None
    slice_axis: int = 0
    min_component_3d: int = 1000
    min_component_2d: int = 100
    instance_labels: tuple[int, ...] = ()
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    split_overrides: dict[str, str] = field(default_factory=dict)
    label_source: str = "unspecified"
    label_alignment: str = "strict"
    description: str = ""
    source: str = ""
    license: str = ""
    spec_file: str | None = None

    # ------------------------------------------------------------- building
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], base_dir: str | Path | None = None, origin: str | None = None
    ) -> DatasetSpec:
        """Validate ``data`` (a YAML/JSON mapping); relative paths are resolved against ``base_dir``."""
        where = origin or "spec"
        if not isinstance(data, dict):
            raise SpecError(f"{where}: a dataset spec must be a mapping, got {type(data).__name__}")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SpecError(
                f"{where}: field 'name': need a folder-safe name (letters, digits, '_', '.', '-', "
                f"not starting with '.' or '-'), got {name!r}"
            )
        where = f"{where}: dataset {name!r}"

        def bad(fld: str, msg: str) -> SpecError:
            return SpecError(f"{where}: field {fld!r}: {msg}")

        unknown = sorted(set(data) - set(_FIELDS) - {"spec_file"})
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_FIELDS)}")
        for req in ("modality", "images", "labels"):
            if data.get(req) in (None, ""):
                raise bad(req, "required")
        try:
            modality = canonical_modality(str(data["modality"]))
        except ValueError as exc:
            raise bad("modality", str(exc)) from None

        base = Path(base_dir) if base_dir is not None else None

        def path_field(fld: str) -> str:
            val = data[fld]
            if not isinstance(val, (str, Path)):
                raise bad(fld, f"need a folder or a glob pattern, got {val!r}")
            p = Path(str(val)).expanduser()
            if not p.is_absolute() and base is not None:
                p = base / p
            return str(p)

        images, labels = path_field("images"), path_field("labels")

        def suffix_field(fld: str) -> str:
            val = data.get(fld, "") or ""
            if not isinstance(val, str) or "/" in val or "\\" in val:
                raise bad(fld, f"need a plain string such as '_0000', got {val!r}")
            return val

        image_suffix, label_suffix = suffix_field("image_suffix"), suffix_field("label_suffix")

        window = data.get("window")
        if window is not None:
            if modality != "CT":
                raise bad("window", f"a window only applies to CT, not to {modality}")
            try:
                parsed = Window.parse(window)
            except ValueError as exc:
                raise bad("window", str(exc)) from None
            window = preset_key(window) if isinstance(window, str) else (parsed.level, parsed.width)
        elif modality == "CT":
            window = "soft_tissue"

        label_names = data.get("label_names") or {}
        if isinstance(label_names, str):
            if label_names.strip().lower() != "header":
                raise bad(
                    "label_names",
                    f"need a mapping {{id: name}} or the word 'header', got {label_names!r}",
                )
            label_names = "header"
        elif isinstance(label_names, dict):
            parsed: dict[int, str] = {}
            for k, v in label_names.items():
                lid = _as_int(k)
                if lid is None or lid <= 0:
                    raise bad("label_names", f"ids must be integers > 0, got {k!r}")
                if not isinstance(v, (str, int, float)) or str(v).strip() == "":
                    raise bad("label_names", f"name of label {lid} must be a non-empty string")
                parsed[lid] = str(v).strip()
            label_names = dict(sorted(parsed.items()))
        else:
            raise bad("label_names", f"need a mapping {{id: name}} or 'header', got {label_names!r}")

        def id_list(fld: str, allow_none: bool = False):
            val = data.get(fld)
            if val is None:
                return None if allow_none else ()
            if isinstance(val, (int, str)):
                val = [val]
            if not isinstance(val, (list, tuple)):
                raise bad(fld, f"need a list of label ids, got {val!r}")
            out = []
            for v in val:
                lid = _as_int(v)
                if lid is None or lid <= 0:
                    raise bad(fld, f"label ids must be integers > 0, got {v!r}")
                out.append(lid)
            return tuple(sorted(set(out)))

        drop_labels = id_list("drop_labels")
        keep_labels = id_list("keep_labels", allow_none=True)
        instance_labels = id_list("instance_labels")

        def int_field(fld: str, default: int, lo: int, hi: int | None = None) -> int:
            val = data.get(fld, default)
            iv = _as_int(val)
            if iv is None or iv < lo or (hi is not None and iv > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise bad(fld, f"need an integer {rng}, got {val!r}")
            return iv

        slice_axis = int_field("slice_axis", 0, 0, 2)
        min3 = int_field("min_component_3d", 1000, 0)
        min2 = int_field("min_component_2d", 100, 0)
        seed = int_field("seed", 0, 0)

        split = data.get("split", (0.8, 0.1, 0.1))
        if isinstance(split, dict):
            extra = set(split) - set(SPLITS)
            if extra:
                raise bad("split", f"unknown split name(s) {sorted(extra)}; use train, val, test")
            split = [split.get(s, 0.0) for s in SPLITS]
        try:
            fr = tuple(float(v) for v in split)
        except (TypeError, ValueError):
            raise bad("split", f"need [train, val, test] fractions, got {split!r}") from None
        if len(fr) != 3 or any(not math.isfinite(v) or v < 0 for v in fr) or abs(sum(fr) - 1) > 1e-6:
            raise bad("split", f"need three fractions >= 0 summing to 1 (train, val, test), got {split!r}")

        overrides = data.get("split_overrides") or {}
        if not isinstance(overrides, dict):
            raise bad("split_overrides", f"need a mapping {{case id: split}}, got {overrides!r}")
        ov: dict[str, str] = {}
        for k, v in overrides.items():
            if str(v) not in SPLITS:
                raise bad("split_overrides", f"case {k!r}: split must be train, val or test, got {v!r}")
            ov[str(k)] = str(v)

        label_source = data.get("label_source", "unspecified")
        if not isinstance(label_source, str) or not label_source.strip():
            raise bad("label_source", f"need a short text (manual, pseudo, atlas ...), got {label_source!r}")
        alignment = data.get("label_alignment", "strict")
        if alignment not in ("strict", "reorient"):
            raise bad("label_alignment", f"need 'strict' or 'reorient', got {alignment!r}")
        texts = {}
        for fld in ("description", "source", "license"):
            val = data.get(fld, "") or ""
            if not isinstance(val, str):
                raise bad(fld, f"need a text, got {val!r}")
            texts[fld] = val
        return cls(
            name=name,
            modality=modality,
            images=images,
            labels=labels,
            image_suffix=image_suffix,
            label_suffix=label_suffix,
            window=window,
            label_names=label_names,
            drop_labels=drop_labels,
            keep_labels=keep_labels,
            slice_axis=slice_axis,
            min_component_3d=min3,
            min_component_2d=min2,
            instance_labels=instance_labels,
            split=fr,
            seed=seed,
            split_overrides=ov,
            label_source=label_source.strip(),
            label_alignment=alignment,
            spec_file=str(data.get("spec_file") or origin or "") or None,
            **texts,
        )

    # ------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (absolute paths, string label ids); :meth:`from_dict` reads it back."""
        return {
            "name": self.name,
            "modality": self.modality,
            "images": self.images,
            "labels": self.labels,
            "image_suffix": self.image_suffix,
            "label_suffix": self.label_suffix,
            "window": list(self.window) if isinstance(self.window, tuple) else self.window,
            "label_names": (
                self.label_names
                if isinstance(self.label_names, str)
                else {str(k): v for k, v in self.label_names.items()}
            ),
            "drop_labels": list(self.drop_labels),
            "keep_labels": None if self.keep_labels is None else list(self.keep_labels),
            "slice_axis": self.slice_axis,
            "min_component_3d": self.min_component_3d,
            "min_component_2d": self.min_component_2d,
            "instance_labels": list(self.instance_labels),
            "split": dict(zip(SPLITS, self.split)),
            "seed": self.seed,
            "split_overrides": dict(self.split_overrides),
            "label_source": self.label_source,
            "label_alignment": self.label_alignment,
            "description": self.description,
            "source": self.source,
            "license": self.license,
            "spec_file": self.spec_file,
        }

    def processing_fingerprint(self) -> str:
        """Hash of every field that changes a case's output (not paths, splits or provenance text).

        A finished case whose recorded fingerprint differs is processed again.
        """
        d = self.to_dict()
        keys = (
            "modality",
            "window",
            "label_names",
            "drop_labels",
            "keep_labels",
            "slice_axis",
            "min_component_3d",
            "min_component_2d",
            "instance_labels",
            "label_alignment",
        )
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def window_level_width(self) -> tuple[float, float] | None:
        """``(level, width)`` of the CT window, ``None`` for other modalities."""
        if self.modality != "CT":
            return None
        if isinstance(self.window, tuple):
            return self.window
        chosen = Window.parse(self.window or "soft_tissue")
        return chosen.level, chosen.width

    def label_name(self, label_id: int, names: dict[int, str] | None = None) -> str:
        table = names if names is not None else (self.label_names if isinstance(self.label_names, dict) else {})
        return table.get(int(label_id), f"label_{int(label_id)}")

    # ------------------------------------------------------------ finding cases
    def find_cases(self) -> tuple[list[CaseSource], list[tuple[str, str, str]]]:
        """Match images and labels by case id.

        Returns ``(cases, problems)``: the matched cases sorted by case id, and
        ``(case, message, path)`` for images without a label and labels without
        an image. Raises :class:`SpecError` when a location matches nothing or
        two entries give the same case id.
        """
        images = self._entries("images", self.images, self.image_suffix)
        labels = self._entries("labels", self.labels, self.label_suffix)
        cases = [CaseSource(self.name, cid, images[cid], labels[cid]) for cid in sorted(set(images) & set(labels))]
        problems = [(cid, "no label matches this image", str(images[cid])) for cid in sorted(set(images) - set(labels))]
        problems += [
            (cid, "no image matches this label", str(labels[cid])) for cid in sorted(set(labels) - set(images))
        ]
        return cases, problems

    def _entries(self, fld: str, location: str, suffix: str) -> dict[str, Path]:
        where = f"{self.spec_file or 'spec'}: dataset {self.name!r}: field {fld!r}"
        if any(c in location for c in _GLOB_CHARS):
            paths = [Path(p) for p in _glob.glob(location)]
            if not paths:
                raise SpecError(f"{where}: pattern {location!r} matches no file")
        else:
            folder = Path(location)
            if not folder.exists():
                raise SpecError(f"{where}: {location} does not exist")
            if not folder.is_dir():
                raise SpecError(f"{where}: {location} is not a folder (give a folder or a glob pattern)")
            paths = list(folder.iterdir())
        out: dict[str, Path] = {}
        for p in sorted(paths):
            if p.name.startswith("."):
                continue
            cid = case_id_of(p, suffix)
            if cid is None:
                continue
            if cid in out:
                raise SpecError(f"{where}: case id {cid!r} given by both {out[cid].name} and {p.name}")
            out[cid] = p
        if not out:
            raise SpecError(
                f"{where}: no image file or DICOM folder found in {location}"
                + (f" whose name ends with {suffix!r}" if suffix else "")
            )
        return out


def case_id_of(path: str | Path, suffix: str = "") -> str | None:
    """Case id of an image/label entry, or ``None`` if the entry is not an image of the dataset.

    A folder (a DICOM series) keeps its name; a file loses its image suffix.
    Then ``suffix`` must end the name and is removed. Ids starting with ``.``
    or empty are refused.
    """
    p = Path(path)
    name = p.name
    if p.is_dir():
        stem = name
    else:
        ext = image_suffix(name)  # the readers' formats (medsam.io.formats)
        if ext is None:
            return None
        stem = name[: -len(ext)]
    if suffix:
        if not stem.endswith(suffix):
            return None
        stem = stem[: -len(suffix)]
    if not stem or stem.startswith(".") or not _NAME_RE.match(stem):
        return None
    return stem


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        return int(v)
    return None


def load_specs(paths: str | Path | Iterable[str | Path]) -> list[DatasetSpec]:
    """Read and validate dataset specs from one or more YAML (or JSON) files."""
    import yaml

    if isinstance(paths, (str, Path)):
        paths = [paths]
    specs: list[DatasetSpec] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: spec file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "datasets" in data and "name" not in data:
            items = data["datasets"]
            if not isinstance(items, list):
                raise SpecError(f"{path}: 'datasets' must be a list of dataset specs")
        elif isinstance(data, list):
            items = data
        elif isinstance(data, dict):
            items = [data]
        else:
            raise SpecError(f"{path}: expected a dataset spec mapping or a list of them, got {type(data).__name__}")
        for item in items:
            specs.append(DatasetSpec.from_dict(item, base_dir=path.parent.resolve(), origin=str(path)))
    check_unique_names(specs)
    return specs


def check_unique_names(specs: Iterable[DatasetSpec]) -> None:
    seen: dict[str, str | None] = {}
    for s in specs:
        if s.name in seen:
            raise SpecError(
                f"dataset name {s.name!r} is used twice ({seen[s.name] or 'spec'} and {s.spec_file or 'spec'})"
            )
        seen[s.name] = s.spec_file


def case_list_digest(case_ids: Iterable[str]) -> str:
    """Digest of a sorted case list; cases of one dataset split from the same list share it."""
    return hashlib.sha256("\n".join(sorted(case_ids)).encode()).hexdigest()[:16]


def assign_splits(
    case_ids: Iterable[str],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """Split cases into train/val/test, deterministically from the sorted case list and the seed.

    Cases named in ``overrides`` get that split. The others are sorted,
    shuffled with ``numpy.random.default_rng(seed)`` and cut into
    ``round(n * val)`` val cases, ``round(n * test)`` test cases (halves
    round up) and the rest train, ``n`` being the number of cases not
    overridden. Override ids that are not in ``case_ids`` raise ``SpecError``.
    """
    ids = sorted(set(case_ids))
    overrides = dict(overrides or {})
    missing = sorted(set(overrides) - set(ids))
    if missing:
        raise SpecError(
            f"field 'split_overrides': case(s) {', '.join(map(repr, missing[:5]))} not among the {len(ids)} cases found"
        )
    free = [c for c in ids if c not in overrides]
    n = len(free)
    order = [free[i] for i in np.random.default_rng(seed).permutation(n)] if n else []
    n_val = int(math.floor(n * fractions[1] + 0.5))
    n_test = int(math.floor(n * fractions[2] + 0.5))
    if n_val + n_test > n:  # only possible when train's fraction is ~0
        n_test = n - n_val
    out = dict(overrides)
    for i, c in enumerate(order):
        out[c] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return {c: out[c] for c in ids}


def nifti_label_names(path: str | Path) -> dict[int, str]:
    """Label names stored in a NIfTI header extension, ``{}`` when there are none.

    Reads the XML label table (``<Label Key="1" ...>name</Label>``) that
    TotalSegmentator and Connectome Workbench (CIFTI/"Caret" extension) write.
    """
    import xml.etree.ElementTree as ET

    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:
        return {}
    exts = getattr(img.header, "extensions", None) or []
    names: dict[int, str] = {}
    for ext in exts:
        content = ext.get_content()
        if isinstance(content, bytes):
            content = content.decode("utf-8", errors="replace")
        if not isinstance(content, str) or "<Label" not in content:
            continue
        try:
            root = ET.fromstring(content.strip().strip("\x00"))
        except ET.ParseError:
            continue
        for el in root.iter("Label"):
            key = _as_int(el.get("Key"))
            text = (el.text or "").strip()
            if key is not None and key > 0 and text:
                names[key] = text
    return dict(sorted(names.items()))
