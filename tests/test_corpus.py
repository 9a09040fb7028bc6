"""The corpus format module (medsam.corpus): writer, index, and the two manifest readers."""

from __future__ import annotations

import numpy as np
import pytest

from medsam import corpus
from medsam.train.synthetic import write_synthetic_corpus


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), slices_per_case=2, size=32)


def test_parquet_and_csv_manifests_hold_the_same_rows(synthetic, monkeypatch):
    pytest.importorskip("pyarrow")
    assert (synthetic / "manifest.parquet").is_file() and (synthetic / "manifest.csv").is_file()
    from medsam.corpus import read

    def refused(*args, **kwargs):
        raise AssertionError("this format must not be read here")

    with monkeypatch.context() as patch:  # the Parquet file is what gets read when it is there
        patch.setattr(read, "_read_csv", refused)
        from_parquet = corpus.read_manifest(synthetic)
    assert isinstance(from_parquet, corpus.Manifest) and len(from_parquet) == 9 * 2 * 2
    (synthetic / "manifest.parquet").rename(synthetic / "manifest.parquet.off")
    try:
        with monkeypatch.context() as patch:
            patch.setattr(read, "_read_parquet", refused)
            from_csv = corpus.read_manifest(synthetic)
    finally:
        (synthetic / "manifest.parquet.off").rename(synthetic / "manifest.parquet")
    assert list(from_parquet) == list(from_csv)
    row = from_parquet[0]
    assert isinstance(row, corpus.ManifestRow) and isinstance(row.x0, int) and isinstance(row.dataset, str)
    assert from_parquet[-1] == list(from_csv)[-1] and from_parquet[1:3] == list(from_csv)[1:3]


def test_manifest_filters(synthetic):
    every = list(corpus.read_manifest(synthetic))
    for kwargs, keep in (
        ({"split": "val"}, lambda r: r.split == "val"),
        ({"datasets": ["synthetic_ct"]}, lambda r: r.dataset == "synthetic_ct"),
        ({"split": "train", "modalities": ["MR"]}, lambda r: r.split == "train" and r.modality == "MR"),
    ):
        assert list(corpus.read_manifest(synthetic, **kwargs)) == [r for r in every if keep(r)]


def test_rows_point_at_their_slices_and_boxes(synthetic):
    for row in list(corpus.read_manifest(synthetic))[:6]:
        image, label, spacing = corpus.load_slice(synthetic, row)
        assert image.dtype == np.uint8 and label.shape == (row.height, row.width) and spacing == (0.8, 0.8)
        ys, xs = np.nonzero(label == row.label)
        assert (xs.min(), ys.min(), xs.max(), ys.max(), len(xs)) == (row.x0, row.y0, row.x1, row.y1, row.area)


def test_broken_corpora_are_refused_with_corpus_error(tmp_path, synthetic):
    with pytest.raises(corpus.CorpusError, match="no manifest"):
        corpus.read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("dataset,case\nx,y\n")
    with pytest.raises(corpus.CorpusError, match="missing columns"):
        corpus.read_manifest(tmp_path)
    row = corpus.read_manifest(synthetic)[0]
    with pytest.raises(corpus.CorpusError, match="missing"):
        corpus.load_slice(tmp_path, row)
    bad = tmp_path / "cases" / "bad.npz"
    bad.parent.mkdir(parents=True)
    np.savez(bad, image=np.zeros((4, 4), np.uint8), label=np.zeros((4, 4), np.uint8), spacing=[0.0, 1.0])
    with pytest.raises(corpus.CorpusError, match="spacing"):
        corpus.load_slice(tmp_path, "cases/bad.npz")


def test_json_records_that_are_not_objects_are_unreadable(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text('{"format": "medsam-corpus-case"}')
    assert corpus.read_json(tmp_path / "a.json") is None
    assert corpus.read_json(tmp_path / "b.json") == {"format": "medsam-corpus-case"}
    case = tmp_path / "cases" / "d" / "c"
    case.mkdir(parents=True)
    (case / "case.json").write_text('"done"')
    assert corpus.finished_case(tmp_path, "d", "c") is None
