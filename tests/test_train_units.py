"""Unit tests of the training pieces: config, losses, box jitter, dataset, sampler, LoRA, checkpoints."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import yaml

from conftest import smooth_image
from medsam.corpus import read_manifest
from medsam.model import build_model
from medsam.preprocess import get_contract
from medsam.preprocess_fast import prepare_image_fast
from medsam.train.checkpoint import rng_state, save_checkpoint, set_rng_state
from medsam.train.config import ConfigError, TrainConfig, load_config
from medsam.train.data import AugmentOptions, EpochSampler, PromptOptions, SegmentationDataset, jitter_box
from medsam.train.loop import lr_factor
from medsam.train.lora import LoRALinear, apply_lora, has_lora, merge_lora
from medsam.train.losses import SegmentationLoss, dice_loss, mask_iou, sigmoid_focal_loss
from medsam.train.synthetic import write_synthetic_corpus

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), cases={"train": 2, "val": 1}, slices_per_case=2)


# ----------------------------------------------------------------------------- config
def test_shipped_configs_parse():
    vit_b = load_config(CONFIGS / "medsam_vit_b.yaml", ["data.corpus=/x"])
    assert (vit_b.model.arch, vit_b.train.mode, vit_b.data.batch_size) == ("vit_b", "full", 8)
    assert (vit_b.train.lr, vit_b.train.weight_decay, vit_b.loss.focal_weight) == (1e-4, 0.01, 20.0)
    tiny = load_config(CONFIGS / "tiny_cpu.yaml")
    assert tiny.model.arch == "vit_tiny" and tiny.train.device == "cpu"


def test_overrides_and_errors(tmp_path):
    cfg = load_config(
        None,
        [
            "train.lr=3e-4",
            "data.augment.flip_prob=0.5",
            "lora.targets=[attn.qkv]",
            "train.resume=auto",
            "model.config_overrides={depth: 2}",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.data.augment.flip_prob == 0.5
    assert cfg.lora.targets == ["attn.qkv"] and cfg.train.resume == "auto"
    assert cfg.model.config_overrides == {"depth": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": "1e-4", "epochs": 2}}))  # YAML reads 1e-4 as a string
    assert load_config(path).train.lr == 1e-4
    for bad, words in [
        (["train.lrr=1"], "train.lrr"),
        (["train.lr=abc"], "train.lr must be a float"),
        (["train.mode=half"], "train.mode"),
        (["train.epochs=1.5"], "train.epochs"),
        (["nosection.x=1"], "nosection"),
        (["train.lr"], "section.field=value"),
        (["data.batch_size=0"], "data.batch_size"),
        (["train.lr=nan"], "train.lr must be a finite number"),
        (["loss.dice_weight=.inf"], "loss.dice_weight must be a finite number"),
    ]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            load_config(None, bad)
    # the config round-trips through plain dicts (as stored in checkpoints)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_lr_schedule():
    total, warm = 100, 10
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # cosine decay is monotone
    assert 0 < f[-1] < 0.01
    assert lr_factor(55, warm, total) == pytest.approx(0.5)
    assert lr_factor(99, 0, 100, min_ratio=0.1) > 0.1


# ----------------------------------------------------------------------------- losses
def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_losses_against_hand_computation():
    z = [0.0, 2.0, -1.0, 3.0]
    t = [1.0, 0.0, 0.0, 1.0]
    logits = torch.tensor(z).view(1, 1, 2, 2)
    targets = torch.tensor(t).view(1, 1, 2, 2)
    # focal: -alpha_t (1 - p_t)^2 log p_t, mean over the 4 pixels
    terms = []
    for zi, ti in zip(z, t):
        p = _sig(zi)
        pt = p if ti else 1 - p
        at = 0.25 if ti else 0.75
        terms.append(-at * (1 - pt) ** 2 * math.log(pt))
    focal = sum(terms) / 4
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(focal, rel=1e-6)
    # Dice (+1 smoothing) and the squared, 1e-5 form of the release
    p = [_sig(v) for v in z]
    inter = sum(a * b for a, b in zip(p, t))
    dice = 1 - (2 * inter + 1) / (sum(p) + sum(t) + 1)
    assert dice_loss(logits, targets).item() == pytest.approx(dice, rel=1e-6)
    dice_sq = 1 - (2 * inter + 1e-5) / (sum(a * a for a in p) + sum(t) + 1e-5)
    assert dice_loss(logits, targets, smooth=1e-5, squared=True).item() == pytest.approx(dice_sq, rel=1e-6)
    # IoU of (logits > 0) = [F, T, F, T] with [T, F, F, T]: 1 / 3
    assert mask_iou(logits, targets).item() == pytest.approx(1 / 3)
    iou_pred = torch.tensor([[0.5]])
    out = SegmentationLoss()(logits, iou_pred, targets)  # same size: the upsampling is the identity
    assert out.total.item() == pytest.approx(20 * focal + dice + (0.5 - 1 / 3) ** 2, rel=1e-5)
    bce = sum(-(ti * math.log(pi) + (1 - ti) * math.log(1 - pi)) for pi, ti in zip(p, t)) / 4
    out = SegmentationLoss("dice_bce", iou_weight=0.0)(logits, iou_pred, targets)
    assert out.total.item() == pytest.approx(dice_sq + bce, rel=1e-5)
    assert set(out.terms) == {"dice", "bce", "iou_mse", "iou"}


def test_loss_upsamples_to_target_size_and_averages_over_objects():
    torch.manual_seed(0)
    low = torch.randn(3, 1, 4, 4)
    targets = (torch.rand(3, 1, 16, 16) > 0.5).float()
    iou = torch.rand(3, 1)
    loss = SegmentationLoss()
    whole = loss(low, iou, targets).total
    parts = torch.stack([loss(low[i : i + 1], iou[i : i + 1], targets[i : i + 1]).total for i in range(3)])
    assert whole.item() == pytest.approx(parts.mean().item(), rel=1e-5)  # splitting a batch over ranks is exact
    up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    assert loss(low, iou, targets).total.item() == pytest.approx(loss(up, iou, targets).total.item(), rel=1e-6)


# ------------------------------------------------------------------------ data, prompts
def test_jittered_box_stays_in_image_and_contains_object():
    rng = np.random.default_rng(0)
    box = np.array([3.0, 5.0, 60.0, 62.0])
    for mode in ("fixed", "proportional"):
        for _ in range(200):
            b = jitter_box(box, rng, (64.0, 64.0), mode, max_shift=20, fraction=0.5)
            assert 0 <= b[0] <= box[0] and 0 <= b[1] <= box[1]
            assert box[2] <= b[2] <= 64 and box[3] <= b[3] <= 64
    b = jitter_box(np.array([20.0, 20.0, 30.0, 30.0]), rng, (64.0, 64.0), "fixed", max_shift=5)
    assert np.all(np.abs(b - [20, 20, 30, 30]) <= 5)
    np.testing.assert_array_equal(jitter_box(box, rng, (64.0, 64.0), "fixed", max_shift=0), box)


def test_dataset_box_contains_object_without_jitter(corpus):
    rows = read_manifest(corpus, "train")
    contract = get_contract("medsam", 256)
    ds = SegmentationDataset(corpus, rows, contract, 64, PromptOptions(jitter=0), train=True)
    for i in range(len(ds)):
        s = ds[(0, i)]
        row = rows[i]
        sx = 256 / row.width
        x0, y0, x1, y1 = s["box"].tolist()
        assert (x0, y0, x1, y1) == pytest.approx((row.x0 * sx, row.y0 * sx, row.x1 * sx, row.y1 * sx))
        ys, xs = np.nonzero(s["target"][0].numpy())  # the object in the input frame
        assert xs.min() >= x0 - sx and xs.max() <= x1 + sx and ys.min() >= y0 - sx and ys.max() <= y1 + sx
        assert s["image"].shape == (3, 256, 256) and s["target"].shape == (1, 256, 256)


def test_dataset_is_reproducible_per_epoch_and_index(corpus):
    rows = read_manifest(corpus, "train")
    ds = SegmentationDataset(
        corpus,
        rows,
        get_contract("medsam", 64),
        16,
        PromptOptions(jitter=200, points=2, negative_points=1, mask_prompt_prob=0.5),
        AugmentOptions(flip_prob=0.5, gamma=(0.7, 1.4), contrast=(0.8, 1.2)),
        train=True,
        seed=3,
    )
    a, b = ds[(2, 5)], ds[(2, 5)]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["points"].shape == (3, 2) and a["point_labels"].tolist() == [1, 1, 0]
    assert a["mask_input"].shape == (1, 16, 16) and a["has_mask"].dtype == torch.bool
    # positive points lie on the object, negative ones off it (input frame = original x 1 here)
    tgt = a["target"][0]
    for (x, y), lab in zip(a["points"].tolist(), a["point_labels"].tolist()):
        assert tgt[int(y), int(x)] == lab
    differs = [not torch.equal(ds[(e, 5)]["box"], a["box"]) for e in range(3, 9)]
    assert any(differs)  # another epoch draws another jitter


def test_fast_prepare_equals_contract():
    for h, w, S, ch in [(64, 64, 256, None), (50, 70, 64, 3), (200, 130, 64, None), (37, 90, 128, 3)]:
        img = smooth_image(h, w, seed=h, channels=ch)
        contract = get_contract("medsam", S)
        ref, g1 = contract.prepare_image(img)
        fast, g2 = prepare_image_fast(contract, img)
        assert g1 == g2 and ref.shape == fast.shape == (1, 3, S, S)
        diff = (ref - fast).abs()
        # equal up to a rare one-grey-level truncation flip
        assert diff.max().item() <= 1.5 / 255 and (diff > 1e-6).float().mean().item() < 1e-3
    lite = get_contract("lite", 64)
    img = smooth_image(40, 50)
    assert torch.equal(prepare_image_fast(lite, img)[0], lite.prepare_image(img)[0])


def test_sampler_steps_are_the_same_global_batches_for_any_world_size():
    n, seed = 37, 5
    single = EpochSampler(n, 1, 0, seed)
    single.set_epoch(3)
    order = [i for _, i in single]
    assert sorted(order) == list(range(n))
    ranks = []
    for r in range(2):
        s = EpochSampler(n, 2, r, seed)
        s.set_epoch(3)
        ranks.append([i for _, i in s])
    for step in range(4):  # global batch 4: 2 per rank
        together = set(ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2])
        assert together == set(order[4 * step : 4 * step + 4])
    s = EpochSampler(n, 2, 1, seed)
    s.set_epoch(3, start=4)
    assert [i for _, i in s] == ranks[1][4:] and len(s) == len(ranks[1]) - 4
    assert all(e == 3 for e, _ in s)
    other = EpochSampler(n, 1, 0, seed)
    other.set_epoch(4)
    assert [i for _, i in other] != order


# ----------------------------------------------------------------------------- LoRA
def test_lora_starts_as_identity_and_merge_equals_unmerged():
    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        before = model.image_encoder(x)
    names = apply_lora(model.image_encoder, ["attn.qkv", "attn.proj"], rank=4, alpha=8.0)
    assert len(names) == 2 * len(model.image_encoder.blocks)
    assert all(isinstance(model.image_encoder.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        assert torch.allclose(model.image_encoder(x), before, atol=1e-6)  # B = 0 at the start
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        adapted = model.image_encoder(x)
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert has_lora(model.state_dict())
    merge_lora(model)
    assert not has_lora(model.state_dict())
    assert set(model.state_dict()) == set(build_model("vit_tiny").state_dict())
    with torch.no_grad():
        merged = model.image_encoder(x)
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Med-SA adapters
def test_medsa_adapters_start_as_identity_train_a_small_fraction_and_skip_the_cpu_kernels():
    from medsam.model.adapters import adapter_parameters
    from medsam.train.trainable import configure_trainable

    vit_b = build_model("vit_b")
    configure_trainable(vit_b, "adapter")
    adapters = sum(p.numel() for p in adapter_parameters(vit_b.image_encoder))
    encoder = sum(p.numel() for p in vit_b.image_encoder.parameters())
    # two bottlenecks of 768 -> 192 -> 768 per block, 12 blocks: 7.1 M, 7.6 % of the adapted encoder
    assert adapters == 12 * 2 * (768 * 192 + 192 + 192 * 768 + 768)
    assert 0.07 < adapters / encoder < 0.08

    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        before = model.image_encoder(x)  # the CPU inference kernels
    names = configure_trainable(model, "adapter")
    assert model.config.adapter == "medsa"
    assert all(n.startswith("mask_decoder.") or "_Adapter." in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder(x), before, rtol=1e-4, atol=1e-4)  # D_fc2 = 0
        for p in adapter_parameters(model.image_encoder):
            p.normal_(0, 0.02)
        inference = model.image_encoder(x)
    assert (inference - before).abs().max() > 1e-2
    with torch.enable_grad():
        training = model.image_encoder(x)  # the autograd path gives the same embedding
    torch.testing.assert_close(training.detach(), inference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- checkpoints
def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint({"rng": rng_state(), "n": 1}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = torch.load(path, weights_only=True)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not list(tmp_path.glob("*.tmp"))
