"""A small demo corpus built from real, public, labelled images that ship inside packages.

Sources (fetched with ``pip download`` or read from a Debian package, checked
against the SHA-256 sums below, cached in ``~/.cache/medsam/sources``):

* **TotalSegmentator 2.18.0 sdist** (Apache-2.0), ``tests/reference_files/``:

  - ``example_ct.nii.gz`` - abdomen/pelvis CT, 3 mm, with
    ``example_seg_fast_force_split.nii.gz`` (61 of the 117 "total" classes present);
  - ``example_ct_dicom/`` - a 20-slice 512x512 CT DICOM series (Siemens
    Biograph40 mCT), with ``example_seg_dicom.nii.gz`` (31 classes). That NIfTI
    stores the same voxel grid with the row axis reversed, so the dataset
    uses ``label_alignment: reorient``;
  - ``aorta_report/example_ct.nii.gz`` - a thorax CT, 1.5 mm, whose labels are
    composed here from the package's per-structure masks of that scan:
    ``pulmonary_report/models/heart.nii.gz`` (same grid) and
    ``aorta_report/test_result/models/{aorta, brachiocephalic_trunk,
    subclavian_artery_left, common_carotid_artery_left, vertebrae_T12}.nii.gz``
    (a crop of the grid, pasted back by nearest-neighbour resampling, voxel
    centres coincide), with TotalSegmentator "total" ids, later ones on top;
  - ``example_mr_sm.nii.gz`` - abdomen MR, 3 mm, with ``example_seg_mr.nii.gz``
    (23 of the 50 "total_mr" classes).

  Every TotalSegmentator label is the TotalSegmentator model's own output: a
  **pseudo-label** (``label_source: pseudo``). ``example_ct_sm.nii.gz`` (a crop
  of ``example_ct``) is not used, so it cannot leak across splits.
  Label names come from the label table in the NIfTI header extension.
* **nilearn 0.14.1 wheel** (BSD-3-Clause): the ICBM 2009a nonlinear symmetric
  MNI152 T1 template (1 mm) and its grey/white-matter probability maps
  (0-255). Tissue labels derived here: 1 grey matter where gm >= 128 (p >= 0.5)
  and gm >= wm; 2 white matter where wm >= 128 and wm > gm
  (``label_source: derived``).
* **Debian mricron-data** (BSD-3-Clause in Debian's copyright file), only when
  ``/usr/share/mricron/templates/`` exists (``apt-get install mricron-data``)
  or another folder is given: Colin27 T1 ``ch2.nii.gz`` with the AAL atlas
  ``aal.nii.gz`` (116 regions, names from ``aal.nii.txt``;
  ``label_source: atlas``).

Splits are explicit (``split_overrides``): the CT DICOM series (another
scanner and acquisition) is the held-out **test** case of ``totalseg_ct``, the
thorax CT is **val**, ``example_ct`` is train; the MR case and the MNI152
template are train; Colin27 (a single subject, unlike the 152-subject
average) is test when present.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.checksum import sha256_file

__all__ = [
    "NILEARN",
    "SLICERIO",
    "TOTALSEGMENTATOR",
    "DemoSourceError",
    "build_demo_corpus",
    "default_cache_dir",
    "extract_nilearn",
    "extract_totalsegmentator",
    "fetch_archive",
    "find_mricron",
    "stage_demo_sources",
]

DEMO_VERSION = "demo-v1"


class DemoSourceError(RuntimeError):
    """A demo source could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class ArchiveSource:
    filename: str
    requirement: str
    sdist: bool
    sha256: str
    size: int
    license: str


# Observed on 2026-11-28 (pip download from PyPI).
TOTALSEGMENTATOR = ArchiveSource(
    filename="totalsegmentator-2.18.0.tar.gz",
    requirement="totalsegmentator==2.18.0",
    sdist=True,
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    size=38049988,
    license="Apache-2.0",
)
NILEARN = ArchiveSource(
    filename="nilearn-0.14.1-py3-none-any.whl",
    requirement="nilearn==0.14.1",
    sdist=False,
    sha256="725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
    size=11509444,
    license="BSD-3-Clause",
)

# Observed on 2026-12-06: a real chest CT with a 7-structure segmentation (benchmarks only).
SLICERIO = ArchiveSource(
    filename="slicerio-1.4.0-py3-none-any.whl",
    requirement="slicerio==1.4.0",
    sdist=False,
    sha256="ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
    size=827115,
    license="MIT",
)

TS_PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"
_AR = "aorta_report/test_result/models/"
# member (relative to TS_PREFIX) -> sha256
TS_MEMBERS: dict[str, str] = {
    "example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "example_seg_fast_force_split.nii.gz": "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
    "example_mr_sm.nii.gz": "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
    "example_seg_mr.nii.gz": "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f",
    "example_seg_dicom.nii.gz": "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc",
    "aorta_report/example_ct.nii.gz": "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12",
    "pulmonary_report/models/heart.nii.gz": "3c3eaf9e029e07aa3248e8d9973103b3168f35cc37756867bcb47b507cad288a",
    _AR + "aorta.nii.gz": "7fa1b813c63abcbe455b62a510c5e7a00fe0998f30541d5a8af46b20a88dd7f7",
    _AR + "brachiocephalic_trunk.nii.gz": "76ce8a3b3e9aeea03c88a358d9c6ceeb66e2fd6fbae33398a4ae4a8596e99661",
    _AR + "subclavian_artery_left.nii.gz": "993695ad2e9833fd3346bedc8e31635d4084c6b8e853620870fb52e41958be9a",
    _AR + "common_carotid_artery_left.nii.gz": "d878d1bb6dd9fe999c6523e4b705f99a1e99b6f77f910edcc9d5d06384a4da9b",
    _AR + "vertebrae_T12.nii.gz": "7baada974082529dc6c1f39bee3ef0b4e384ad020c0b7c1d3971d69e9576e0af",
}
TS_DICOM_DIR = "example_ct_dicom"
TS_DICOM_FILES = 20
# sha256 of the text `sha256sum *` prints in that folder (lines "<sha256>  <name>\n", sorted by name)
TS_DICOM_DIGEST = "cb296a70a6457e000d4244a78eec9240766a55f4aaf7b41682619bc30d617810"

_NL = "nilearn/datasets/data/mni_icbm152_"
NILEARN_MEMBERS: dict[str, str] = {
    _NL + "t1_tal_nlin_sym_09a_converted.nii.gz": "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    _NL + "gm_tal_nlin_sym_09a_converted.nii.gz": "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    _NL + "wm_tal_nlin_sym_09a_converted.nii.gz": "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
}

MRICRON_DIR = Path("/usr/share/mricron/templates")
# Debian bookworm mricron-data 1.2.20211006+dfsg-4
MRICRON_FILES: dict[str, str] = {
    "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    "aal.nii.gz": "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
    "aal.nii.txt": "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e",
}

# thorax CT labels: (file relative to TS_PREFIX, TotalSegmentator "total" id), painted in this order
AORTA_CASE_LABELS: tuple[tuple[str, int], ...] = (
    ("pulmonary_report/models/heart.nii.gz", 51),
    ("aorta_report/test_result/models/aorta.nii.gz", 52),
    ("aorta_report/test_result/models/brachiocephalic_trunk.nii.gz", 54),
    ("aorta_report/test_result/models/subclavian_artery_left.nii.gz", 56),
    ("aorta_report/test_result/models/common_carotid_artery_left.nii.gz", 58),
    ("aorta_report/test_result/models/vertebrae_T12.nii.gz", 32),
)
MNI_TISSUE_THRESHOLD = 128  # of 255, i.e. probability >= 0.5


# --------------------------------------------------------------------------- fetching
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medsam" / "sources"


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise DemoSourceError(f"{what}: SHA-256 {got} does not match the expected {expected}")


def fetch_archive(src: ArchiveSource, cache_dir: str | Path | None = None, offline: bool = False) -> Path:
    """The archive ``src`` in ``cache_dir``, downloaded with ``pip download`` unless cached and valid."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / src.filename
    if target.is_file() and sha256_file(target) == src.sha256:
        return target
    if offline:
        raise DemoSourceError(f"{target}: not in the cache (or corrupt) and offline mode is on")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "--no-binary" if src.sdist else "--only-binary",
            ":all:",
            src.requirement,
            "-d",
            str(tmp),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / src.filename
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DemoSourceError(f"pip download {src.requirement} failed: {' | '.join(tail) or 'no file'}")
        _check(got, src.sha256, f"downloaded {src.filename}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_member(data_src, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    with open(tmp, "wb") as f:
        shutil.copyfileobj(data_src, f)
    os.replace(tmp, dest)


def _dicom_digest(folder: Path) -> str:
    lines = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file())
    return hashlib.sha256(lines.encode()).hexdigest()


def extract_totalsegmentator(cache_dir: str | Path | None = None, offline: bool = False) -> Path:
    """Folder holding the verified ``tests/reference_files`` members the demo uses."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    root = cache / "totalsegmentator-2.18.0" / "reference_files"
    dicom = root / TS_DICOM_DIR
    try:
        for rel, sha in TS_MEMBERS.items():
            _check(root / rel, sha, str(root / rel))
        if _dicom_digest(dicom) != TS_DICOM_DIGEST:
            raise DemoSourceError("dicom")
        return root
    except (OSError, DemoSourceError):
        pass
    archive = fetch_archive(TOTALSEGMENTATOR, cache, offline)
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or not m.name.startswith(TS_PREFIX):
                continue
            rel = m.name[len(TS_PREFIX) :]
            if rel in TS_MEMBERS or (rel.startswith(TS_DICOM_DIR + "/") and rel.count("/") == 1):
                _write_member(tar.extractfile(m), root / rel)
    for rel, sha in TS_MEMBERS.items():
        if not (root / rel).is_file():
            raise DemoSourceError(f"{archive}: member {TS_PREFIX}{rel} missing")
        _check(root / rel, sha, f"{archive}:{rel}")
    files = [p for p in dicom.iterdir() if p.is_file()] if dicom.is_dir() else []
    if len(files) != TS_DICOM_FILES or _dicom_digest(dicom) != TS_DICOM_DIGEST:
        raise DemoSourceError(f"{archive}: {TS_DICOM_DIR}/ does not hold the expected {TS_DICOM_FILES} files")
    return root


def extract_nilearn(cache_dir: str | Path | None = None, offline: bool = False) -> Path:
    """Folder holding the verified MNI152 template files from the nilearn wheel."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    root = cache / "nilearn-0.14.1"
    try:
        for rel, sha in NILEARN_MEMBERS.items():
            _check(root / rel, sha, str(root / rel))
        return root
    except (OSError, DemoSourceError):
        pass
    archive = fetch_archive(NILEARN, cache, offline)
    with zipfile.ZipFile(archive) as zf:
        for rel in NILEARN_MEMBERS:
            with zf.open(rel) as src:
                _write_member(src, root / rel)
    for rel, sha in NILEARN_MEMBERS.items():
        _check(root / rel, sha, f"{archive}:{rel}")
    return root


def find_mricron(mricron_dir: str | Path | None = None) -> tuple[Path | None, str]:
    """``(folder, "")`` when the Colin27/AAL files are there with the expected checksums, else ``(None, why)``."""
    folder = Path(mricron_dir) if mricron_dir else MRICRON_DIR
    if not folder.is_dir():
        return None, f"{folder} not found (apt-get install mricron-data to add Colin27 + AAL)"
    for name, sha in MRICRON_FILES.items():
        p = folder / name
        if not p.is_file():
            return None, f"{p} missing"
        got = sha256_file(p)
        if got != sha:
            return None, f"{p}: SHA-256 {got} is not the expected {sha} (another mricron-data version?)"
    return folder, ""


# --------------------------------------------------------------------------- staging
def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.stat().st_size == src.stat().st_size and sha256_file(dest) == sha256_file(src):
        return
    shutil.copyfile(src, dest)


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    from ..io.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(
            "# Written by medsam.curate.demo_corpus; paths are relative to this file.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
            encoding="utf-8",
        )


def _array_digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def _compose_aorta_label(ts_root: Path, dest: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    from ..io import read_image, write_mask

    ref_path = ts_root / "aorta_report/example_ct.nii.gz"
    ref_img = read_image(ref_path)
    ref = sitk.ReadImage(str(ref_path))
    out = np.zeros(ref_img.spatial_shape, dtype=np.uint8)
    for rel, lid in AORTA_CASE_LABELS:
        m = sitk.ReadImage(str(ts_root / rel))
        # voxel centres must coincide: same spacing/direction, integer index offset
        if not np.allclose(m.GetSpacing(), ref.GetSpacing()) or not np.allclose(m.GetDirection(), ref.GetDirection()):
            raise DemoSourceError(f"{rel}: grid differs from the thorax CT's")
        idx = ref.TransformPhysicalPointToContinuousIndex(m.GetOrigin())
        if not np.allclose(idx, np.rint(idx), atol=1e-3):
            raise DemoSourceError(f"{rel}: voxel centres do not coincide with the thorax CT's")
        res = sitk.Resample(m, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        arr = sitk.GetArrayFromImage(res)
        out[arr > 0] = lid
    write_mask(out, ref_img, dest)
    return {"sha256_array": _array_digest(out), "voxels": {str(k): int((out == k).sum()) for _, k in AORTA_CASE_LABELS}}


def _mni_tissue_label(nl_root: Path, dest_img: Path, dest_lab: Path) -> dict[str, Any]:
    from ..io import read_image, write_mask

    t1p = nl_root / (_NL + "t1_tal_nlin_sym_09a_converted.nii.gz")
    t1 = read_image(t1p)
    gm = read_image(nl_root / (_NL + "gm_tal_nlin_sym_09a_converted.nii.gz")).array.astype(np.int16)
    wm = read_image(nl_root / (_NL + "wm_tal_nlin_sym_09a_converted.nii.gz")).array.astype(np.int16)
    lab = np.zeros(t1.spatial_shape, dtype=np.uint8)
    lab[(gm >= MNI_TISSUE_THRESHOLD) & (gm >= wm)] = 1
    lab[(wm >= MNI_TISSUE_THRESHOLD) & (wm > gm)] = 2
    _copy(t1p, dest_img)
    write_mask(lab, t1, dest_lab)
    return {"sha256_array": _array_digest(lab), "voxels": {"1": int((lab == 1).sum()), "2": int((lab == 2).sum())}}


def _aal_names(txt: Path) -> dict[int, str]:
    names = {}
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def stage_demo_sources(
    cache_dir: str | Path | None = None,
    include_mricron: bool = True,
    mricron_dir: str | Path | None = None,
    offline: bool = False,
) -> tuple[list[Path], dict[str, Any]]:
    """Fetch, verify and lay out the demo datasets; returns ``(spec files, provenance)``.

    Layout: ``<cache>/demo-v1/<dataset>/{images,labels}/<case>...`` and
    ``<cache>/demo-v1/<dataset>/dataset.yaml``.
    """
    from .dataset_spec import nifti_label_names

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    stage = cache / DEMO_VERSION
    ts = extract_totalsegmentator(cache, offline)
    nl = extract_nilearn(cache, offline)
    prov: dict[str, Any] = {
        "demo_version": DEMO_VERSION,
        "archives": {
            s.filename: {
                "requirement": s.requirement,
                "sha256": s.sha256,
                "bytes": s.size,
                "license": s.license,
                "how": "pip download --no-deps " + ("--no-binary :all: " if s.sdist else "") + s.requirement,
            }
            for s in (TOTALSEGMENTATOR, NILEARN)
        },
        "members": {
            **{TS_PREFIX + k: v for k, v in TS_MEMBERS.items()},
            TS_PREFIX + TS_DICOM_DIR + "/ (sha256 of its sha256sum listing)": TS_DICOM_DIGEST,
            **NILEARN_MEMBERS,
        },
        "derived": {},
    }
    specs: list[Path] = []

    # --- TotalSegmentator CT: three cases, one label id space ("total" task)
    d = stage / "totalseg_ct"
    _copy(ts / "example_ct.nii.gz", d / "images/example_ct.nii.gz")
    _copy(ts / "example_seg_fast_force_split.nii.gz", d / "labels/example_ct.nii.gz")
    for f in sorted((ts / TS_DICOM_DIR).iterdir()):
        _copy(f, d / "images/example_ct_dicom" / f.name)
    _copy(ts / "example_seg_dicom.nii.gz", d / "labels/example_ct_dicom.nii.gz")
    _copy(ts / "aorta_report/example_ct.nii.gz", d / "images/aorta_report_ct.nii.gz")
    prov["derived"]["totalseg_ct/labels/aorta_report_ct.nii.gz"] = _compose_aorta_label(
        ts, d / "labels/aorta_report_ct.nii.gz"
    )
    ct_names = nifti_label_names(ts / "example_seg_fast_force_split.nii.gz")
    if len(ct_names) != 117:
        raise DemoSourceError(f"expected 117 TotalSegmentator class names, found {len(ct_names)}")
    _write_yaml(
        d / "dataset.yaml",
        {
            "name": "totalseg_ct",
            "modality": "CT",
            "images": "images",
            "labels": "labels",
            "window": "soft_tissue",
            "label_names": ct_names,
            "min_component_3d": 100,
            "min_component_2d": 10,
            "label_alignment": "reorient",
            "split_overrides": {"example_ct": "train", "aorta_report_ct": "val", "example_ct_dicom": "test"},
            "label_source": "pseudo",
            "description": (
                "TotalSegmentator 2.18.0 reference files: abdomen CT 3 mm (example_ct), thorax CT 1.5 mm "
                "(aorta_report_ct, labels composed from per-structure masks), CT DICOM series 512x512 "
                "(example_ct_dicom, held-out test). Labels are the TotalSegmentator model's outputs (pseudo-labels)."
            ),
            "source": f"PyPI {TOTALSEGMENTATOR.requirement} sdist, {TS_PREFIX}",
            "license": "Apache-2.0",
        },
    )
    specs.append(d / "dataset.yaml")

    # --- TotalSegmentator MR
    d = stage / "totalseg_mr"
    _copy(ts / "example_mr_sm.nii.gz", d / "images/example_mr_sm.nii.gz")
    _copy(ts / "example_seg_mr.nii.gz", d / "labels/example_mr_sm.nii.gz")
    _write_yaml(
        d / "dataset.yaml",
        {
            "name": "totalseg_mr",
            "modality": "MR",
            "images": "images",
            "labels": "labels",
            "label_names": nifti_label_names(ts / "example_seg_mr.nii.gz"),
            "min_component_3d": 100,
            "min_component_2d": 10,
            "split_overrides": {"example_mr_sm": "train"},
            "label_source": "pseudo",
            "description": (
                "TotalSegmentator 2.18.0 reference MR (abdomen, 3 mm); labels are model outputs (pseudo-labels)."
            ),
            "source": f"PyPI {TOTALSEGMENTATOR.requirement} sdist, {TS_PREFIX}",
            "license": "Apache-2.0",
        },
    )
    specs.append(d / "dataset.yaml")

    # --- MNI152 tissue
    d = stage / "mni152_tissue"
    prov["derived"]["mni152_tissue/labels/mni152_2009a.nii.gz"] = _mni_tissue_label(
        nl, d / "images/mni152_2009a.nii.gz", d / "labels/mni152_2009a.nii.gz"
    )
    _write_yaml(
        d / "dataset.yaml",
        {
            "name": "mni152_tissue",
            "modality": "MR",
            "images": "images",
            "labels": "labels",
            "label_names": {1: "grey_matter", 2: "white_matter"},
            "split_overrides": {"mni152_2009a": "train"},
            "label_source": "derived",
            "description": (
                "ICBM 2009a nonlinear symmetric MNI152 T1 template (1 mm) from the nilearn 0.14.1 wheel. "
                f"Labels: 1 grey matter where gm >= {MNI_TISSUE_THRESHOLD}/255 (p >= 0.5) and gm >= wm, "
                f"2 white matter where wm >= {MNI_TISSUE_THRESHOLD}/255 and wm > gm (thresholded template "
                "probability maps, not a manual segmentation)."
            ),
            "source": f"PyPI {NILEARN.requirement} wheel, nilearn/datasets/data/",
            "license": "BSD-3-Clause (nilearn); ICBM 2009a template terms of the MNI",
        },
    )
    specs.append(d / "dataset.yaml")

    # --- Colin27 + AAL (optional)
    prov["mricron"] = None
    if include_mricron:
        folder, why = find_mricron(mricron_dir)
        if folder is None:
            prov["mricron_skipped"] = why
        else:
            d = stage / "colin27_aal"
            _copy(folder / "ch2.nii.gz", d / "images/colin27.nii.gz")
            _copy(folder / "aal.nii.gz", d / "labels/colin27.nii.gz")
            _write_yaml(
                d / "dataset.yaml",
                {
                    "name": "colin27_aal",
                    "modality": "MR",
                    "images": "images",
                    "labels": "labels",
                    "label_names": _aal_names(folder / "aal.nii.txt"),
                    "split_overrides": {"colin27": "test"},
                    "label_source": "atlas",
                    "description": (
                        "Colin27 single-subject T1 (ch2, 1 mm) with the AAL atlas (116 regions) from Debian "
                        "mricron-data; held-out test brain (a single subject, unlike the MNI152 average)."
                    ),
                    "source": f"Debian mricron-data, {folder}",
                    "license": "BSD-3-Clause (Debian copyright file of mricron-data)",
                },
            )
            specs.append(d / "dataset.yaml")
            prov["mricron"] = {"folder": str(folder), "files": MRICRON_FILES}
    else:
        prov["mricron_skipped"] = "not requested"
    # drop a colin27 folder staged earlier when mricron is not used now
    if prov["mricron"] is None and (stage / "colin27_aal").exists():
        shutil.rmtree(stage / "colin27_aal")
    return specs, prov


def build_demo_corpus(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
    include_mricron: bool = True,
    mricron_dir: str | Path | None = None,
    offline: bool = False,
):
    """Fetch and stage the demo sources, then :func:`~medsam.curate.prepare.prepare` them into ``out_dir``.

    Writes ``OUT/provenance.json`` (archives, checksums, what was skipped) next
    to the corpus. Returns the :class:`~medsam.curate.prepare.PrepareReport`.
    """
    import json

    from ..io.atomic import atomic_output
    from .dataset_spec import load_specs
    from .prepare import prepare

    spec_files, prov = stage_demo_sources(cache_dir, include_mricron, mricron_dir, offline)
    specs = load_specs(spec_files)
    report = prepare(specs, out_dir, workers=workers, progress=progress)
    prov["spec_files"] = [str(p) for p in spec_files]
    prov["label_sources"] = {s.name: s.label_source for s in specs}
    with atomic_output(Path(out_dir) / "provenance.json") as tmp:
        tmp.write_text(json.dumps(prov, indent=1) + "\n", encoding="utf-8")
    return report
