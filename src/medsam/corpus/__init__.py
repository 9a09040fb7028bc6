"""The curated corpus: its layout, writer, index and reader, in one place.

Curation (:mod:`medsam.curate.prepare`), the workbench's training job, training
(:mod:`medsam.train`), the benchmark, the specialist and the embedding store all read and write a
corpus through this module. Layout (``OUT``)::

    corpus.json        {"format": "medsam-corpus", "version": 1, "datasets": [spec dicts],
                        "created", "updated", "medsam_version", "label_sources", "counts"}
    manifest.csv       one row per (slice, object), columns MANIFEST_COLUMNS: dataset, case, slice,
                       label, label_name, modality, x0, y0, x1, y1 (inclusive pixel box, x = column),
                       area, split, path, height, width
    manifest.parquet   the same rows, columnar (written when pyarrow is installed); read in
                       preference to the CSV, a split, datasets and modalities at a time
    summary.csv        per dataset, modality and label: cases, slices, objects, voxels, cases per split
    errors.csv         cases that could not be curated: dataset, case, stage, error, image, label
    cases/<dataset>/<case>/case.json
    cases/<dataset>/<case>/slices/<slice:04d>.npz   image (H, W[, 3]) uint8,
                       label (H, W) uint8|uint16, spacing (2,) float64 mm (row, col)
    errors/<dataset>/<case>.json   one record per broken case (errors.csv is built from them)

A case folder is written under a hidden temporary name and renamed when complete, so a case
folder that exists is finished. The manifest, summary and error list are rebuilt from every
finished ``case.json`` (:func:`build_index`), so corpora curated in pieces merge by copying their
``cases/`` and ``errors/`` folders into one ``OUT`` and indexing it again.
"""

from __future__ import annotations

from .read import Manifest, group_by_slice, load_slice, mask_bbox, read_manifest, slice_identity
from .schema import (
    CASE_FORMAT,
    CORPUS_FORMAT,
    CORPUS_VERSION,
    ERROR_COLUMNS,
    MANIFEST_COLUMNS,
    SPLITS,
    SUMMARY_COLUMNS,
    CaseError,
    CorpusError,
    ManifestRow,
    case_dir,
    error_file,
    finished_case,
    read_json,
)
from .write import build_index, index_corpus, slice_objects, write_case, write_corpus_json, write_manifest

__all__ = [
    "CASE_FORMAT",
    "CORPUS_FORMAT",
    "CORPUS_VERSION",
    "ERROR_COLUMNS",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "SUMMARY_COLUMNS",
    "CaseError",
    "CorpusError",
    "Manifest",
    "ManifestRow",
    "build_index",
    "case_dir",
    "error_file",
    "finished_case",
    "group_by_slice",
    "index_corpus",
    "load_slice",
    "mask_bbox",
    "read_json",
    "read_manifest",
    "slice_identity",
    "slice_objects",
    "write_case",
    "write_corpus_json",
    "write_manifest",
]
