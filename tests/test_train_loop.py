"""The training loop in one process: it learns, validates like the Predictor, saves weights-only
checkpoints, resumes exactly, trains the right parameters per mode, and exports for load_model."""

from __future__ import annotations

import csv

import pytest
import torch

import medsam
from medsam.corpus import read_manifest
from medsam.metrics import dice_score
from medsam.model import build_model
from medsam.predictor import Predictor
from medsam.train.config import load_config
from medsam.train.data import ValidationSlices
from medsam.train.export import export_checkpoint, model_from_checkpoint
from medsam.train.loop import Trainer
from medsam.train.synthetic import write_synthetic_corpus
from medsam.train.trainable import build_initial_model
from medsam.train.validate import per_object_scores, validate

MICRO = (
    "model.config_overrides={img_size: 64, patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2, "
    "global_attn_indexes: [1], window_size: 8, embedding_size: 16}"
)


def micro_overrides(corpus, out, *extra):
    """A 64-px, 2-block ViT: a few milliseconds a step on one core."""
    return [
        "model.arch=vit_tiny",
        MICRO,
        f"data.corpus={corpus}",
        f"output.dir={out}",
        "data.batch_size=2",
        "data.workers=0",
        "data.val_max_samples=4",
        "train.epochs=0",
        "train.lr=1e-3",
        "train.device=cpu",
        "train.progress=false",
        "output.tensorboard=false",
        "train.log_every=2",
        *extra,
    ]


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), cases={"train": 6, "val": 2}, slices_per_case=4)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("small"), cases={"train": 2, "val": 1}, slices_per_case=4, seed=1
    )


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """vit_tiny from random weights, 80 steps of batch 4 (about 20 s on one core): at this scale
    validation DSC dips to 0 (empty masks) early in some sample orders before it rises."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None,
        [
            "model.arch=vit_tiny",
            f"data.corpus={corpus}",
            f"output.dir={out}",
            "data.batch_size=4",
            "data.workers=0",
            "train.epochs=0",
            "train.max_steps=80",
            "train.lr=1e-3",
            "train.device=cpu",
            "train.save_every=40",
            "train.val_every=40",
            "train.log_every=5",
            "train.progress=false",
            "output.tensorboard=false",
        ],
    )
    trainer = Trainer(cfg)
    start = validate(trainer.model, trainer.val_slices)["all"]
    result = trainer.fit()
    return trainer, result, start, out


def test_training_lowers_loss_and_raises_validation_dsc(trained):
    _trainer, result, start, out = trained
    rows = read_metrics(out / "metrics.csv")
    train_loss = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert train_loss[-1] < 0.7 * train_loss[0]
    end = result.metrics["all"]
    assert end["dsc"] > start["dsc"] + 0.15, (start, end)
    assert end["nsd"] > start["nsd"] + 0.1
    assert end["n"] == 16 and {"CT", "MR", "all"} <= set(result.metrics)
    val = [r for r in rows if r["split"] == "val"]
    assert {r["modality"] for r in val} == {"CT", "MR", "all"}
    assert {int(r["step"]) for r in val} == {40, 80}
    assert all(float(r["throughput"]) > 0 for r in rows if r["split"] == "train")
    assert result.global_step == 80 and (out / "config.yaml").exists()


def test_checkpoints_are_weights_only_and_best_is_chosen_by_validation_dsc(trained):
    trainer, _result, _, out = trained
    latest = torch.load(out / "latest.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert latest["global_step"] == 80 and latest["epoch"] == 80 // trainer.steps_per_epoch
    val_all = {
        int(r["step"]): float(r["dsc"])
        for r in read_metrics(out / "metrics.csv")
        if r["split"] == "val" and r["modality"] == "all"
    }
    best_step = max(val_all, key=val_all.get)
    assert best["global_step"] == best_step
    assert best["best_dsc"] == pytest.approx(max(val_all.values()), abs=1e-6)
    for key in ("optimizer", "scheduler", "scaler", "rng", "config", "model_config", "contract"):
        assert key in latest
    # the latest checkpoint is the trainer's model
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(latest["model"][k], v)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_export_loads_with_load_model_and_gives_the_same_logits(trained, tmp_path):
    trainer, _, _, out = trained
    path = export_checkpoint(out / "latest.pt", tmp_path / "model.safetensors")
    loaded = medsam.load_model(path, device="cpu")
    assert loaded.contract == trainer.model.contract and loaded.config == trainer.model.config
    x = torch.rand(2, 3, 256, 256)
    box = torch.tensor([[40.0, 50.0, 180.0, 200.0], [10.0, 10.0, 100.0, 90.0]])
    trainer.model.eval()
    with torch.no_grad():
        a = trainer.model.decode(trainer.model.embed_image(x), boxes=box)
        b = loaded.decode(loaded.embed_image(x), boxes=box)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.iou, b.iou)
    # load_model also reads the training checkpoint itself (state dict under "model")
    direct = medsam.load_model(out / "latest.pt", device="cpu")
    assert torch.equal(direct.mask_decoder.iou_token.weight, loaded.mask_decoder.iou_token.weight)


def test_validation_is_the_predictor_path(corpus):
    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    rows = read_manifest(corpus, "val")[:6]
    slices = ValidationSlices(corpus, rows, Predictor(model).contract)
    got = per_object_scores(model, slices, batch_size=2)
    from medsam.corpus import load_slice, mask_bbox

    predictor = Predictor(model, zoom=False)
    expected = []
    for row in rows:
        image, label, _ = load_slice(corpus, row)
        gt = label == row.label
        predictor.set_image(image)
        pred = predictor.predict(boxes=mask_bbox(gt))
        expected.append(dice_score(pred.masks[0], gt))
    assert [r["dsc"] for r in got] == pytest.approx(expected, abs=1e-9)
    assert any(0 < d < 1 for d in expected)  # a random model still draws masks: not a vacuous match


def test_validation_with_lesions_and_the_zoom_recipe_is_what_a_user_gets(tmp_path):
    """data.val_lesions / data.val_zoom: each grey-level slice also gives fixed lesion copies
    (modality "<m> lesion"), and every object is segmented as Predictor(model) does by default
    (small boxes zoomed); the same lesions at every validation."""
    from medsam.corpus import load_slice, mask_bbox
    from medsam.train.config import ConfigError, TrainConfig
    from medsam.train.embedding_store import LesionViews
    from medsam.train.validate import summarize_by_modality

    corpus = write_synthetic_corpus(tmp_path / "wide", {"val": 2}, slices_per_case=1, size=192)
    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    rows = read_manifest(corpus, "val")
    lesions = LesionViews(2, 7, ("cyst", "nodule"))
    contract = Predictor(model).contract
    slices = ValidationSlices(corpus, rows, contract, lesions=lesions, pixels=True)
    got = per_object_scores(model, slices, batch_size=2)
    predictor = Predictor(model)  # the default: the model's zoom recipe
    expected, zoomed = [], 0
    slice_rows = list({r.path: r for r in rows}.values())
    for path, row in list({r.path: r for r in rows}.items()):
        image, label, _ = load_slice(corpus, row)
        predictor.set_image(image)
        for r in rows:
            if r.path == path:
                gt = label == r.label
                prediction = predictor.predict(boxes=mask_bbox(gt))
                expected.append(("plain", dice_score(prediction.masks[0], gt)))
                zoomed += int(prediction.zoomed[0])
    for row in slice_rows:
        image, label, _ = load_slice(corpus, row)
        for k in range(2):
            lesion = lesions.lesion(image, label, row.path, k)
            predictor.set_image(lesion.image)
            prediction = predictor.predict(boxes=mask_bbox(lesion.mask))
            expected.append(("lesion", dice_score(prediction.masks[0], lesion.mask)))
            zoomed += int(prediction.zoomed[0])
    assert [r["dsc"] for r in got] == pytest.approx([d for _, d in expected], abs=1e-6)
    assert zoomed >= 1  # the recipe zoomed some object
    modalities = {r["modality"] for r in got}
    assert any(m.endswith(" lesion") for m in modalities) and len(modalities) >= 2
    assert sum(r["modality"].endswith(" lesion") for r in got) == 2 * len(slice_rows)
    again = per_object_scores(model, ValidationSlices(corpus, rows, contract, lesions=lesions, pixels=True))
    assert [r["dsc"] for r in again] == [r["dsc"] for r in got]
    assert summarize_by_modality(got)["all"]["n"] == len(rows) + 2 * len(slice_rows)
    base = {"model": {"arch": "vit_tiny"}, "data": {"corpus": str(corpus)}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match=r"data\.val_lesions"):
        TrainConfig.from_dict({**base, "data": {"corpus": str(corpus), "val_lesions": -1}})


def test_a_run_validates_on_lesions_when_asked(small_corpus, tmp_path):
    extra = ["train.max_steps=2", "train.val_every=2", "data.val_lesions=1", "data.val_zoom=true"]
    trainer = Trainer(load_config(None, micro_overrides(small_corpus, tmp_path / "run", *extra)))
    assert trainer.val_slices.pixels and trainer.val_slices.lesions.variants == 1
    trainer.fit()
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["split"] == "val"]
    lesion_rows = [r for r in val if r["modality"].endswith(" lesion")]
    assert lesion_rows and all(0.0 <= float(r["dsc"]) <= 1.0 for r in lesion_rows)


def test_resume_after_a_crash_ends_with_the_same_weights(small_corpus, tmp_path):
    # 16 samples, batch 2 x accumulation 2: 4 steps an epoch; 10 steps cross two epoch ends.
    extra = ["train.max_steps=10", "train.save_every=3", "train.accumulation=2"]
    Trainer(load_config(None, micro_overrides(small_corpus, tmp_path / "a", *extra))).fit()

    class Crash(RuntimeError):
        pass

    class CrashingTrainer(Trainer):
        def optimizer_step(self):
            if self.global_step == 7:
                raise Crash
            super().optimizer_step()

    with pytest.raises(Crash):
        CrashingTrainer(load_config(None, micro_overrides(small_corpus, tmp_path / "b", *extra))).fit()
    saved = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert (saved["global_step"], saved["epoch"], saved["step_in_epoch"]) == (6, 1, 2)  # mid-epoch
    with pytest.raises(FileExistsError):  # a fresh run never overwrites a run folder
        Trainer(load_config(None, micro_overrides(small_corpus, tmp_path / "b", *extra))).fit()
    with pytest.raises(ValueError, match="global batch"):
        Trainer(
            load_config(
                None, micro_overrides(small_corpus, tmp_path / "b", *extra, "train.resume=auto", "data.batch_size=4")
            )
        ).fit()
    resumed = Trainer(load_config(None, micro_overrides(small_corpus, tmp_path / "b", *extra, "train.resume=auto")))
    resumed.fit()
    assert resumed.resumed_from == tmp_path / "b" / "latest.pt"
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert (b["global_step"], b["epoch"], b["step_in_epoch"]) == (10, 2, 2)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-7)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    # the log of the resumed run reads as the uninterrupted one (rows after the checkpoint dropped)
    strip = lambda rows: [(r["step"], r["split"], r["modality"], r["loss"], r["dsc"]) for r in rows]
    assert strip(read_metrics(tmp_path / "b" / "metrics.csv")) == strip(read_metrics(tmp_path / "a" / "metrics.csv"))


def test_modes_train_only_their_parameters(small_corpus, tmp_path):
    init = build_initial_model(load_config(None, ["model.arch=vit_tiny", MICRO]).model, seed=0).state_dict()
    changed = {}
    for mode in ("full", "decoder", "lora", "adapter"):
        cfg = load_config(
            None,
            micro_overrides(
                small_corpus,
                tmp_path / mode,
                f"train.mode={mode}",
                "train.max_steps=2",
                "data.val_split=null",
                "lora.rank=2",
                "lora.targets=[attn.qkv]",
            ),
        )
        trainer = Trainer(cfg)
        trainer.fit()
        state = torch.load(tmp_path / mode / "latest.pt", weights_only=True)["model"]
        changed[mode] = {k for k in init if not torch.equal(state[k], init[k])}
        if mode == "lora":
            lora_keys = {k for k in state if k.endswith((".lora_A", ".lora_B"))}
            assert len(lora_keys) == 2 * 2  # 2 blocks x qkv x (A, B)
            assert any(not torch.equal(state[k], torch.zeros_like(state[k])) for k in lora_keys if k.endswith("B"))
        if mode == "adapter":
            adapter_keys = {k for k in state if "_Adapter." in k}
            assert len(adapter_keys) == 2 * 2 * 4  # 2 blocks x 2 adapters x (fc1, fc2) x (weight, bias)
            assert all(not torch.equal(state[k], torch.zeros_like(state[k])) for k in adapter_keys if "D_fc2.w" in k)
    enc = lambda keys: {k for k in keys if k.startswith("image_encoder.")}
    for mode in changed:
        assert not any(k.startswith("prompt_encoder.") for k in changed[mode]), mode
        assert any(k.startswith("mask_decoder.") for k in changed[mode]), mode
    assert enc(changed["full"]) and not enc(changed["decoder"]) and not enc(changed["lora"])
    assert not enc(changed["adapter"])  # the original encoder weights stay frozen

    # Med-SA adapters cannot be merged: the exported model keeps them and load_model rebuilds them
    adapted_medsa, _ = model_from_checkpoint(tmp_path / "adapter" / "latest.pt")
    kept = medsam.load_model(export_checkpoint(tmp_path / "adapter" / "latest.pt", tmp_path / "ad.safetensors"))
    assert kept.config.adapter == "medsa"
    x = torch.rand(1, 3, 64, 64)
    box = torch.tensor([[5.0, 8.0, 40.0, 50.0]])
    with torch.no_grad():
        a = adapted_medsa.decode(adapted_medsa.embed_image(x), boxes=box).logits
        b = kept.decode(kept.embed_image(x), boxes=box).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    # LoRA: export merges the adapters; load_model reads the result and matches the adapted model
    adapted, _ = model_from_checkpoint(tmp_path / "lora" / "latest.pt", merge=False)
    path = export_checkpoint(tmp_path / "lora" / "latest.pt", tmp_path / "lora.safetensors")
    merged = medsam.load_model(path, device="cpu")
    x = torch.rand(1, 3, 64, 64)
    box = torch.tensor([[5.0, 8.0, 40.0, 50.0]])
    with torch.no_grad():
        a = adapted.decode(adapted.embed_image(x), boxes=box).logits
        b = merged.decode(merged.embed_image(x), boxes=box).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_bf16_and_gradient_checkpointing_run(small_corpus, tmp_path):
    cfg = load_config(
        None,
        micro_overrides(
            small_corpus,
            tmp_path / "r",
            "train.max_steps=2",
            "train.precision=bf16",
            "train.grad_checkpointing=true",
            "data.val_split=null",
            "data.points=1",
            "data.negative_points=1",
            "data.mask_prompt_prob=0.5",
            "data.augment.flip_prob=0.5",
            "loss.kind=dice_bce",
        ),
    )
    result = Trainer(cfg).fit()
    assert result.global_step == 2
    state = torch.load(tmp_path / "r" / "latest.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_cli_train_and_export(small_corpus, tmp_path, capsys):
    from medsam.cli import main

    over = micro_overrides(small_corpus, tmp_path / "cli", "train.max_steps=2", "data.val_split=null")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  seed: 7\n")
    assert main(["train", str(cfg), *over]) == 0
    assert main(["export", str(tmp_path / "cli" / "latest.pt"), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert medsam.load_model(tmp_path / "m.safetensors", device="cpu").config.img_size == 64
    assert main(["train", str(cfg), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert main(["train", str(cfg), *over]) == 2  # the folder holds a run: refuse without resume
    assert "train.resume=auto" in capsys.readouterr().err


def test_tensorboard_scalars_when_installed(small_corpus, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(
        None,
        micro_overrides(
            small_corpus,
            tmp_path / "tb",
            "train.max_steps=2",
            "output.tensorboard=true",
            "data.val_max_samples=2",
        ),
    )
    Trainer(cfg).fit()
    events = list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_worker_writes_a_structured_result(small_corpus, tmp_path):
    """medsam.train.worker: the outcome in a JSON file, the error as the loop raised it."""
    import json

    from medsam.train.worker import run

    cfg = tmp_path / "c.yaml"
    over = micro_overrides(small_corpus, tmp_path / "w", "train.max_steps=2", "data.val_split=null")
    from medsam.train.config import dump_config, load_config

    cfg.write_text(dump_config(load_config(None, over)))
    assert run(cfg, tmp_path / "ok.json") == 0
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["ok"] is True and ok["global_step"] == 2 and (tmp_path / "w" / "latest.pt").is_file()
    assert run(cfg, tmp_path / "again.json") == 1  # the folder holds a run now: refused, said why
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["ok"] is False and again["kind"] == "FileExistsError" and "train.resume=auto" in again["error"]
