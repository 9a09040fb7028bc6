"""Decoder-only training on precomputed embeddings (data.cache_embeddings): the stored embeddings
are the encoder's, items match the uncached ones, the store is reused or rebuilt by fingerprint,
and a run with it trains the decoder only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam.corpus import load_slice, mask_bbox, read_manifest
from medsam.predictor import Predictor
from medsam.train.config import ConfigError, load_config
from medsam.train.data import PromptOptions, SegmentationDataset, mask_to_input_frame
from medsam.train.embedding_store import build_embedding_store, whole_key, zoom_key
from medsam.train.loop import Trainer
from medsam.train.synthetic import write_synthetic_corpus
from medsam.zoom import ZoomPolicy, zoom_window
from test_train_loop import micro_overrides


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("store_corpus"), cases={"train": 2, "val": 1}, slices_per_case=3, size=96
    )


def _overrides(corpus, out, store, *extra):
    return micro_overrides(corpus, out, "train.mode=decoder", f"data.cache_embeddings={store}", *extra)


def test_store_holds_the_encoder_outputs_of_slices_and_zoom_crops(corpus, tmp_path, tiny_model):
    rows = read_manifest(corpus, "train")
    from medsam.preprocess import get_contract

    contract = get_contract(tiny_model.contract, tiny_model.input_size)
    policy = ZoomPolicy(context=1.5, min_side=8, max_crop_fraction=0.9)
    store = build_embedding_store(tiny_model, corpus, rows, contract, tmp_path / "store", policy)
    slices = {r.path for r in rows}
    zoomed = [r for r in rows if zoom_key(r) in store]
    assert len(store) == len(slices) + len(zoomed) and zoomed
    predictor = Predictor(tiny_model)
    for row in rows[:2] + zoomed[:2]:
        image, label, _ = load_slice(corpus, row)
        key = whole_key(row)
        if row in zoomed[:2]:
            y0, y1, x0, x1 = zoom_window(mask_bbox(label == row.label), label.shape, 1.5, 8)
            image, key = image[y0:y1, x0:x1].copy(), zoom_key(row)
        predictor.set_image(image)
        expected = predictor.embedding[0]
        got = store[key]
        # float16 storage: relative error ~1e-3
        assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    # same encoder, corpus and policy: reused (the file is not rewritten)
    mtime = (tmp_path / "store" / "part-000000.f16").stat().st_mtime_ns
    again = build_embedding_store(tiny_model, corpus, rows, contract, tmp_path / "store", policy)
    assert (tmp_path / "store" / "part-000000.f16").stat().st_mtime_ns == mtime and len(again) == len(store)
    # another encoder: rebuilt
    with torch.no_grad():
        next(tiny_model.image_encoder.parameters()).add_(1.0)
    rebuilt = build_embedding_store(tiny_model, corpus, rows, contract, tmp_path / "store", policy)
    assert rebuilt.fingerprint != store.fingerprint


def test_cached_items_equal_uncached_items_but_for_the_image(corpus, tmp_path, tiny_model):
    rows = read_manifest(corpus, "train")
    from medsam.preprocess import get_contract

    contract = get_contract(tiny_model.contract, tiny_model.input_size)
    store = build_embedding_store(tiny_model, corpus, rows, contract, tmp_path / "s", None)
    prompts = PromptOptions(jitter=20, clicks=2)
    L = tiny_model.prompt_encoder.mask_input_size[0]
    plain = SegmentationDataset(corpus, rows, contract, L, prompts, train=True, seed=3)
    cached = SegmentationDataset(corpus, rows, contract, L, prompts, train=True, seed=3, store=store)
    for i in range(len(rows)):
        a, b = plain[(1, i)], cached[(1, i)]
        assert "image" not in b and b["embedding"].shape == store[whole_key(rows[i])].shape
        for k in ("target", "box", "clicks", "click_labels"):
            torch.testing.assert_close(a[k], b[k])


def test_config_refuses_cache_with_full_training_or_pixel_augmentation(corpus, tmp_path):
    with pytest.raises(ConfigError, match="mode: decoder"):
        load_config(None, _overrides(corpus, tmp_path, tmp_path / "s", "train.mode=full", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="pixel augmentations"):
        load_config(
            None, _overrides(corpus, tmp_path, tmp_path / "s", "data.augment.flip_prob=0.5", "train.max_steps=1")
        )


def test_decoder_training_on_the_store_learns_and_leaves_the_encoder(corpus, tmp_path):
    cfg = load_config(
        None,
        _overrides(
            corpus,
            tmp_path / "run",
            tmp_path / "store",
            "train.max_steps=30",
            "train.val_every=30",
            "train.save_every=30",
            "data.clicks=2",
            "data.augment.zoom_prob=0.5",
        ),
    )
    trainer = Trainer(cfg)
    encoder_before = {k: v.clone() for k, v in trainer.model.image_encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in trainer.model.mask_decoder.state_dict().items()}
    result = trainer.fit()
    assert result.global_step == 30
    for k, v in trainer.model.image_encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert any(not torch.equal(v, decoder_before[k]) for k, v in trainer.model.mask_decoder.state_dict().items())
    assert (tmp_path / "store" / "index.json").is_file()
    import csv

    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_decoder_mode_keeps_batchnorm_statistics_of_the_frozen_encoder(corpus, tmp_path):
    """LiteMedSAM's TinyViT has BatchNorm: decoder-only training must not move its running
    statistics (the encoder runs in eval mode), through training steps and validation."""
    cfg = load_config(
        None,
        [
            "model.arch=lite",
            f"data.corpus={corpus}",
            f"output.dir={tmp_path / 'run'}",
            "data.batch_size=2",
            "data.workers=0",
            "data.val_max_samples=2",
            "train.epochs=0",
            "train.max_steps=3",
            "train.val_every=2",
            "train.save_every=0",
            "train.lr=1e-3",
            "train.device=cpu",
            "train.progress=false",
            "output.tensorboard=false",
            "train.mode=decoder",
            "train.precision=fp32",
        ],
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.image_encoder.state_dict().items()}
    assert any("running_mean" in k for k in before)
    trainer.fit()
    for k, v in trainer.model.image_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_store_lesion_copies_are_the_encoder_outputs_of_the_pasted_slices(corpus, tmp_path, tiny_model):
    """LesionViews: each slice gets ``variants`` lesion copies (and crops of the small ones), each
    the encoder's output for the slice with that lesion pasted; a training item with a lesion
    reads its copy and targets the lesion; a store without lesions keeps its fingerprint."""
    from medsam.preprocess import get_contract
    from medsam.train.data import AugmentOptions
    from medsam.train.embedding_store import LesionViews, lesion_key, lesion_zoom_key
    from medsam.train.lesions import LESION_KINDS

    rows = read_manifest(corpus, "train")
    contract = get_contract(tiny_model.contract, tiny_model.input_size)
    policy = ZoomPolicy(context=3.0, min_side=8, max_crop_fraction=0.5)
    plain = build_embedding_store(tiny_model, corpus, rows, contract, tmp_path / "plain", policy)
    lesions = LesionViews(2, seed=5, kinds=tuple(LESION_KINDS))
    store = build_embedding_store(tiny_model, corpus, rows, contract, tmp_path / "les", policy, lesions=lesions)
    assert store.fingerprint != plain.fingerprint
    slices = {r.path: r for r in rows}
    crops = [(r, k) for r in slices.values() for k in range(2) if lesion_zoom_key(r, k) in store]
    assert len(store) == len(plain) + 2 * len(slices) + len(crops) and crops
    predictor = Predictor(tiny_model, zoom=False)
    for row, k in [(rows[0], 0), (rows[0], 1), crops[0]]:
        image, label, _ = load_slice(corpus, row)
        lesion = lesions.lesion(image, label, row.path, k)
        assert lesion.mask.any() and not np.array_equal(lesion.image, image)
        for key, picture in ((lesion_key(row, k), lesion.image), (lesion_zoom_key(row, k), None)):
            if picture is None:
                if key not in store:
                    continue
                y0, y1, x0, x1 = zoom_window(mask_bbox(lesion.mask), label.shape, 3.0, 8)
                picture = lesion.image[y0:y1, x0:x1].copy()
            predictor.set_image(picture)
            expected = predictor.embedding[0]
            assert torch.allclose(store[key], expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    L = tiny_model.prompt_encoder.mask_input_size[0]
    augment = AugmentOptions(lesion_prob=1.0)
    data = SegmentationDataset(
        corpus, rows, contract, L, PromptOptions(jitter=0), augment, True, 3, store=store, store_lesions=lesions
    )
    seen = set()
    for i in range(len(rows)):
        item = data[(0, i)]
        image, label, _ = load_slice(corpus, rows[i])
        matches = [k for k in range(2) if torch.equal(item["embedding"], store[lesion_key(rows[i], k)])]
        assert len(matches) == 1
        k = matches[0]
        seen.add(k)
        mask = lesions.lesion(image, label, rows[i].path, k).mask
        torch.testing.assert_close(item["target"], mask_to_input_frame(mask, contract.geometry(mask.shape)))
    assert seen == {0, 1}
    # lesion_weights: a sample takes its slice's copy of the favoured kind wherever there is one
    kinds = [[lesions.lesion(*load_slice(corpus, r)[:2], r.path, k).kind for k in range(2)] for r in rows]
    assert kinds == [[lesions.kind(r.path, k) for k in range(2)] for r in rows]  # without drawing
    favoured = kinds[0][0]
    weights = tuple(1.0 if k == favoured else 0.0 for k in lesions.kinds)
    augment = AugmentOptions(lesion_prob=1.0, lesion_kinds=lesions.kinds, lesion_weights=weights)
    data = SegmentationDataset(
        corpus, rows, contract, L, PromptOptions(jitter=0), augment, True, 3, store=store, store_lesions=lesions
    )
    for i in range(len(rows)):
        item = data[(0, i)]
        (k,) = [k for k in range(2) if torch.equal(item["embedding"], store[lesion_key(rows[i], k)])]
        assert kinds[i][k] == favoured or favoured not in kinds[i]
