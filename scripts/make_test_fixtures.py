#!/usr/bin/env python
"""Rebuild the tiny real-data fixtures in tests/data/curation/ (committed; about 100 KB).

Source: the TotalSegmentator 2.18.0 sdist on PyPI (Apache-2.0), fetched with
``pip download`` and checked by SHA-256 through :mod:`medsam.curate.demo_corpus`
(cache: ~/.cache/medsam/sources, or --cache).

* ct/: a crop of ``tests/reference_files/example_ct.nii.gz`` (3 mm abdomen CT)
  and of ``example_seg_fast_force_split.nii.gz``, voxel index (i, j, k) in
  [20:84, 16:64, 74:98] (64 x 48 x 24 voxels, file order), CT stored as int16;
* mr/: ``example_mr_sm.nii.gz`` and ``example_seg_mr.nii.gz`` downsampled by 2
  in-plane (every second voxel along i and j: nearest neighbour, spacing 6 mm),
  all 20 slices.

The labels keep their header label table (TotalSegmentator class names). They
are TotalSegmentator model outputs: pseudo-labels. The affines are those of
the crops (nibabel's slicer), so the geometry stays true.

Usage: python scripts/make_test_fixtures.py [--cache DIR] [--out tests/data/curation]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medsam.curate.demo_corpus import extract_totalsegmentator

CT_CROP = (slice(20, 84), slice(16, 64), slice(74, 98))
MR_STEP = (slice(None, None, 2), slice(None, None, 2), slice(None))

README = """\
Tiny real-data fixtures for tests/test_prepare.py (rebuild: python scripts/make_test_fixtures.py)

Source: TotalSegmentator 2.18.0 source distribution on PyPI (pip download --no-deps
--no-binary :all: totalsegmentator==2.18.0), folder tests/reference_files/.
Licence: Apache-2.0 (TotalSegmentator, Wasserthal et al.).

ct/images/example_ct_crop.nii.gz      crop of example_ct.nii.gz, voxel index (i, j, k)
ct/labels/example_ct_crop_seg.nii.gz  [20:84, 16:64, 74:98] of the file (64 x 48 x 24, 3 mm),
                                      and the same crop of example_seg_fast_force_split.nii.gz;
                                      CT stored as int16 (Hounsfield units unchanged)
mr/images/example_mr_sm_ds.nii.gz     example_mr_sm.nii.gz and example_seg_mr.nii.gz
mr/labels/example_mr_sm_ds_seg.nii.gz downsampled by 2 in-plane (every second voxel along i
                                      and j, nearest neighbour; 6 x 6 x 3 mm), all 20 slices

The label files keep the label table of the original header extension (class names).
All labels are TotalSegmentator model outputs, i.e. PSEUDO-LABELS, not manual annotations.

SHA-256 of the files written:
"""


def _save(img: nib.Nifti1Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _as_int16(img: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj)
    if data.min() < -32768 or data.max() > 32767:
        raise SystemExit("CT values do not fit int16")
    hdr = img.header.copy()
    hdr.set_data_dtype(np.int16)
    out = nib.Nifti1Image(data.astype(np.int16), img.affine, hdr)
    out.header.set_slope_inter(1, 0)
    return out


def _label(img: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj).astype(np.uint8)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.uint8)
    return nib.Nifti1Image(data, img.affine, hdr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/curation")
    args = ap.parse_args()
    ts = extract_totalsegmentator(args.cache)
    out = args.out

    files = {
        "ct/images/example_ct_crop.nii.gz": _as_int16(nib.load(str(ts / "example_ct.nii.gz")).slicer[CT_CROP]),
        "ct/labels/example_ct_crop_seg.nii.gz": _label(
            nib.load(str(ts / "example_seg_fast_force_split.nii.gz")).slicer[CT_CROP]
        ),
        "mr/images/example_mr_sm_ds.nii.gz": nib.load(str(ts / "example_mr_sm.nii.gz")).slicer[MR_STEP],
        "mr/labels/example_mr_sm_ds_seg.nii.gz": _label(nib.load(str(ts / "example_seg_mr.nii.gz")).slicer[MR_STEP]),
    }
    lines = []
    for rel, img in files.items():
        _save(img, out / rel)
        digest = hashlib.sha256((out / rel).read_bytes()).hexdigest()
        lines.append(f"{digest}  {rel}")
        print(f"{rel}: shape {img.shape}, {(out / rel).stat().st_size} bytes")
    (out / "README.txt").write_text(README + "\n".join(lines) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"total {total} bytes in {out}")


if __name__ == "__main__":
    main()
