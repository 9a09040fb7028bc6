"""DICOM reading: series folders (sorted along the slice normal) and single files.

Slice order comes from GDCM (through ``SimpleITK.ImageSeriesReader``): files are
sorted by ImagePositionPatient projected on the slice normal, so ``array[k]``
is the k-th slice along the normal, whatever the file names or their order on
disk. The slice spacing is the distance between neighbouring slice positions
(not SliceThickness).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ._sitk import from_sitk, short_reason
from .errors import ImageReadError
from .image import MedicalImage

__all__ = ["SeriesInfo", "is_dicom_file", "list_dicom_series", "read_dicom_file", "read_dicom_series"]


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder.

    ``files`` are in GDCM's order (along the slice normal when positions
    allow; :func:`read_image` re-checks it); ``n_slices`` counts frames (a
    multi-frame file counts for its NumberOfFrames).
    """

    series_uid: str
    description: str
    modality: str
    n_slices: int
    files: tuple[str, ...]


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` starts with the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _header(path: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, EOFError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """List the DICOM series directly inside ``folder`` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder")
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise ImageReadError(f"{folder}: cannot scan for DICOM series ({short_reason(exc)})") from exc
    infos = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        n_slices = 0
        first = None
        for f in files:
            ds = _header(f)
            first = first if first is not None else ds
            n_slices += int(ds.get("NumberOfFrames", 1) or 1)
        infos.append(
            SeriesInfo(
                series_uid=str(uid),
                description=str(first.get("SeriesDescription", "") or ""),
                modality=str(first.get("Modality", "") or ""),
                n_slices=n_slices,
                files=files,
            )
        )
    return infos


def _describe(infos: list[SeriesInfo]) -> str:
    return "; ".join(
        f"{i.series_uid} ({i.modality or '?'}, {i.description or 'no description'!r}, {i.n_slices} slices)"
        for i in infos
    )


def _sorted_slices(files: tuple[str, ...], folder: Path) -> tuple[str, ...]:
    """Files sorted by position along the slice normal (ascending), checked.

    GDCM already sorts this way, but silently falls back on file-name order
    when positions clash; sorting and checking here makes the order explicit.
    Duplicated positions are refused; non-uniform spacing gives a warning.
    Without patient geometry (e.g. secondary capture) GDCM's order is kept.
    """
    headers = [_header(f) for f in files]
    try:
        iop = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
        ipp = np.asarray([h.ImagePositionPatient for h in headers], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return files
    if iop.shape != (6,) or ipp.shape != (len(files), 3):
        return files
    normal = np.cross(iop[:3], iop[3:])
    pos = ipp @ normal
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise ImageReadError(
            f"{folder}: several slices share the same position in series "
            f"{headers[0].get('SeriesInstanceUID', '?')} (several echoes, phases or "
            "acquisitions in one series?); split the series first"
        )
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > max(0.01 * step, 1e-3):
        warnings.warn(
            f"{folder}: slice spacing is not uniform (gaps from {gaps.min():.4g} to "
            f"{gaps.max():.4g} mm); the volume uses a single spacing, so positions "
            "of some slices are approximate",
            RuntimeWarning,
            stacklevel=3,
        )
    return tuple(files[i] for i in order)


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> MedicalImage:
    """Read one DICOM series from ``folder`` as a ``(Z, Y, X)`` volume.

    With several series in the folder, ``series_uid`` must name one; otherwise
    an :class:`ImageReadError` lists them all.
    """
    folder = Path(folder)
    infos = list_dicom_series(folder)
    if not infos:
        raise ImageReadError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None:
        if len(infos) > 1:
            raise ImageReadError(
                f"{folder}: contains {len(infos)} DICOM series, pass series_uid= to choose one: " + _describe(infos)
            )
        info = infos[0]
    else:
        matches = [i for i in infos if i.series_uid == series_uid]
        if not matches:
            raise ImageReadError(f"{folder}: no series with SeriesInstanceUID {series_uid}; found: " + _describe(infos))
        info = matches[0]
    if len(info.files) == 1:
        image = read_dicom_file(info.files[0])
        image.source_path = folder
        return image
    files = _sorted_slices(info.files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"{folder}: cannot read DICOM series {info.series_uid} ({short_reason(exc)})") from exc
    return from_sitk(
        img,
        folder,
        "dicom-series",
        series_uid=info.series_uid,
        modality=info.modality or None,
        source_files=files,
    )


def read_dicom_file(path: str | Path) -> MedicalImage:
    """Read one DICOM file: a single frame gives a 2D image, a multi-frame file a volume."""
    path = Path(path)
    ds = _header(str(path))
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data ({short_reason(exc)})") from exc
    uid = ds.get("SeriesInstanceUID")
    return from_sitk(
        img,
        path,
        "dicom",
        series_uid=str(uid) if uid else None,
        modality=str(ds.get("Modality", "")) or None,
        source_files=(str(path),),
    )
