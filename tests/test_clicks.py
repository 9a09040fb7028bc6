"""Corrective clicks from errors (medsam.clicks) and their use in training (data.click_source)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam.clicks import add_error_clicks, next_click
from medsam.train.config import ConfigError, TrainConfig


def test_next_click_goes_deepest_into_the_largest_error():
    gt = np.zeros((40, 50), bool)
    gt[5:35, 5:45] = True
    pred = gt.copy()
    pred[10:19, 10:19] = False  # a 9 x 9 missed square: centre (14, 14), depth 5
    assert next_click(pred, gt) == (14, 14, 1)
    pred[0:40, 46:50] = True  # a false strip 4 wide along the right border: depth 2 (border = outside)
    assert next_click(pred, gt) == (14, 14, 1)
    pred = gt.copy()
    pred[10:19, 10:19] = False
    wrong = np.zeros_like(gt)
    wrong[22:33, 30:41] = True  # an 11 x 11 hole in the object that the mask fills: depth 6 > 5
    assert next_click(pred | wrong, gt & ~wrong) == (35, 27, 0)  # negative click at its centre
    assert next_click(gt, gt) is None


def _toy_forward(box_mask: torch.Tensor):
    """A stand-in model: positive logits inside the box, except a 5 x 5 square around each negative
    click; positive again in a 5 x 5 square around each positive click. (B, 1, L, L) logits."""

    def forward(boxes=None, points=None, point_labels=None, **_):
        logits = torch.where(box_mask, 5.0, -5.0).clone()
        if points is not None:
            for b in range(points.shape[0]):
                for (x, y), lab in zip(points[b].tolist(), point_labels[b].tolist()):
                    if lab < 0:
                        continue
                    xi, yi = int(round(x)), int(round(y))
                    logits[b, 0, max(0, yi - 2) : yi + 3, max(0, xi - 2) : xi + 3] = 5.0 if lab == 1 else -5.0
        return logits, torch.zeros(logits.shape[0], 1)

    return forward


def test_add_error_clicks_follows_the_models_errors():
    L = 32
    box = torch.zeros(2, 1, L, L, dtype=torch.bool)
    box[:, :, 4:28, 4:28] = True
    target = box.clone().to(torch.uint8)
    target[0, 0, 8:13, 8:13] = 0  # sample 0: a 5 x 5 hole the box covers -> negative click at (10, 10)
    # sample 1: the target is exactly the box -> already perfect: padding points (label -1)
    inputs = {"boxes": torch.zeros(2, 4), "points": None, "point_labels": None}
    out = add_error_clicks(_toy_forward(box), inputs, target, rounds=2)
    assert inputs["points"] is None  # the caller's dict is not modified
    assert out["points"].shape == (2, 2, 2) and out["point_labels"].shape == (2, 2)
    assert out["points"][0, 0].tolist() == [10.0, 10.0] and out["point_labels"][0, 0] == 0
    # after the first click the toy model's mask is perfect for sample 0: the second is padding
    assert out["point_labels"][0, 1] == -1 and out["point_labels"][1].tolist() == [-1, -1]


def test_add_error_clicks_maps_low_res_clicks_to_the_input_frame():
    L, S = 16, 64
    box = torch.zeros(1, 1, L, L, dtype=torch.bool)
    box[:, :, 2:14, 2:14] = True
    target = torch.zeros(1, 1, S, S, dtype=torch.uint8)
    target[:, :, 8:56, 8:56] = 1
    target[:, :, 8:56, 40:56] = 0  # box columns 10-13 at L = 16 are not object,
    target[:, :, 8:16, 8:56] = 0  # nor box rows 2-3: an L-shaped false region at L = 16
    out = add_error_clicks(_toy_forward(box), {"boxes": torch.zeros(1, 4)}, target, rounds=1)
    gt = torch.nn.functional.interpolate(target.float(), size=(L, L), mode="nearest-exact").bool()[0, 0].numpy()
    expected = next_click(box[0, 0].numpy(), gt)  # the rule itself, at L = 16
    assert expected is not None and expected[2] == 0
    x, y = out["points"][0, 0].tolist()
    assert out["point_labels"][0, 0] == 0
    # mapped to the 64 px frame: pixel centre (x + 0.5) * 4 - 0.5
    assert (x, y) == ((expected[0] + 0.5) * 4 - 0.5, (expected[1] + 0.5) * 4 - 0.5)


def test_config_checks_click_source():
    base = {"model": {"arch": "vit_tiny"}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="click_source"):
        TrainConfig.from_dict({**base, "data": {"click_source": "oracle"}})
    assert (
        TrainConfig.from_dict({**base, "data": {"clicks": 3, "click_source": "errors"}}).data.click_source == "errors"
    )
    with pytest.raises(ConfigError, match="click_loss"):
        TrainConfig.from_dict({**base, "data": {"click_loss": "first"}})
    assert TrainConfig.from_dict({**base, "data": {"click_loss": "every"}}).data.click_loss == "every"


# A short decoder-only run with three clicks per step (with test_train_loop.micro_overrides).
_CLICK_RUN = (
    "data.val_max_samples=2",
    "train.val_every=0",
    "train.save_every=0",
    "train.mode=decoder",
    "train.precision=fp32",
    "data.clicks=3",
)


def test_training_with_error_clicks_gives_the_model_its_own_corrections(tmp_path, monkeypatch):
    """data.click_source=errors: on steps with k clicks the loop asks add_error_clicks for k rounds
    on the batch's own target (the dataset draws no random clicks), and the run trains."""
    from medsam.train import loop
    from medsam.train.config import load_config
    from medsam.train.data import clicks_for_step
    from medsam.train.synthetic import write_synthetic_corpus
    from test_train_loop import micro_overrides

    corpus = write_synthetic_corpus(tmp_path / "c", cases={"train": 2, "val": 1}, slices_per_case=2, size=96)
    cfg = load_config(
        None,
        micro_overrides(
            corpus,
            tmp_path / "run",
            *_CLICK_RUN,
            "train.max_steps=8",
            "data.click_prob=0.7",
            "data.click_source=errors",
        ),
    )
    calls = []
    real = loop.add_error_clicks

    def spy(forward, inputs, target, rounds):
        out = real(forward, inputs, target, rounds)
        calls.append((rounds, out["points"].shape, out["point_labels"].clone()))
        return out

    monkeypatch.setattr(loop, "add_error_clicks", spy)
    trainer = loop.Trainer(cfg)
    assert trainer.train_set.prompts.clicks == 0  # no random clicks drawn
    result = trainer.fit()
    assert result.global_step == 8
    expected = [k for k in (clicks_for_step(cfg.train.seed, s, 3, 0.7) for s in range(8)) if k]
    assert [c[0] for c in calls] == expected and expected
    for k, shape, labels in calls:
        assert shape == (2, k, 2) and set(labels.flatten().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("source", ["random", "errors", "scribbles"])
def test_click_loss_every_averages_the_rounds_from_box_only_to_all_clicks(tmp_path, source):
    """data.click_loss=every: a step with k clicks back-propagates the mean of the losses of the
    box with the first 0..k clicks (strokes of 4 padded points for scribbles); its gradients equal
    those of that mean computed by hand."""
    from medsam.train import loop
    from medsam.train.config import load_config
    from medsam.train.data import clicks_for_step, collate
    from medsam.train.synthetic import write_synthetic_corpus
    from test_train_loop import micro_overrides

    corpus = write_synthetic_corpus(tmp_path / "c", cases={"train": 2, "val": 1}, slices_per_case=2, size=96)
    cfg = load_config(
        None,
        micro_overrides(
            corpus,
            tmp_path / "run",
            *_CLICK_RUN,
            "train.lr=1e-4",
            "train.max_steps=4",
            "data.click_prob=1.0",
            f"data.click_source={source}",
            "data.click_loss=every",
        ),
    )
    trainer = loop.Trainer(cfg)
    step = next(s for s in range(50) if clicks_for_step(cfg.train.seed, s, 3, 1.0) >= 2)
    trainer.global_step = step
    k = clicks_for_step(cfg.train.seed, step, 3, 1.0)
    batch = collate([trainer.train_set[i] for i in range(2)])
    params = [p for p in trainer.step_module.parameters() if p.requires_grad]

    width = 4 if source == "scribbles" else 1
    inputs, n_clicks = trainer._inputs(batch)
    assert n_clicks == k * width and inputs["points"].shape[1] == k * width
    rounds = trainer._rounds(inputs, n_clicks)
    assert [None if r["points"] is None else r["points"].shape[1] for r in rounds] == [
        None,
        *(width * j for j in range(1, k + 1)),
    ]
    for j, r in enumerate(rounds[1:], start=1):  # nested prefixes of the same corrections
        torch.testing.assert_close(r["points"], inputs["points"][:, : j * width])
    target = batch["target"]
    losses = []
    for r in rounds:
        logits, iou = trainer.step_module(**r)
        losses.append(trainer.loss_fn(logits, iou, target).total)
    expected = torch.autograd.grad(torch.stack(losses).mean(), params, allow_unused=True)

    for p in params:
        p.grad = None
    out = trainer.micro_step(batch, sync=True)  # error clicks: placed again, the same (deterministic)
    assert float(out["loss"]) == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-5)
    for p, g in zip(params, expected):
        if g is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)

    # data.click_loss=last (the default): one round, the prediction with all k clicks
    trainer.cfg.data.click_loss = "last"
    assert len(trainer._rounds(inputs, n_clicks)) == 1
    assert len(trainer._rounds(inputs, 0)) == 1
