"""SAM2-family fine-tuning on clips of a real labelled CT volume (the bundled sample), with a
small Hiera trunk at 128 px and seeded random weights.

The training forward is the tracking inference (checked against ``track_volume``, which the
tracking tests check against the reference ``sam2`` video predictor); a run learns, resumes
exactly and exports a file ``medsam.load_model`` reads and tracks with.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import medsam
from medsam.tracking import track_volume
from medsam.train import sam2_clips
from medsam.train.config import ConfigError, TrainConfig
from medsam.train.loop import train
from medsam.volume import Box2D

SAMPLES = Path(medsam.__path__[0]) / "data" / "samples"
TINY = {"img_size": 128, "stages": [1, 1, 2, 1], "global_att_blocks": [3]}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for folder in ("images", "labels"):
        (root / folder).mkdir()
    shutil.copy(SAMPLES / "ct_volume.nii.gz", root / "images" / "ct.nii.gz")
    shutil.copy(SAMPLES / "ct_volume_label.nii.gz", root / "labels" / "ct.nii.gz")
    return root


def _config(volumes: Path, out: Path, **train) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"arch": "sam2.1_hiera_tiny", "config_overrides": TINY},
            "clips": {"volumes": str(volumes), "frames": 4, "labels": [1]},
            "train": {"warmup_steps": 0, "log_every": 1, **train},
            "output": {"dir": str(out), "tensorboard": False},
        }
    )


def _case(volumes: Path) -> sam2_clips.ClipVolume:
    return sam2_clips.load_case(volumes / "images" / "ct.nii.gz", volumes / "labels" / "ct.nii.gz", [1], None, None)


def _fixed_clip_loss(model, cfg, case) -> dict[str, float]:
    clip = sam2_clips.make_clip(case, 1, [4, 5, 6, 7], model, cfg, np.random.default_rng(0), "box")
    with torch.no_grad():
        return sam2_clips.clip_loss(sam2_clips.track_clip(model, clip, False), clip.targets, cfg).terms


def test_the_training_forward_is_the_tracking_inference(volumes, tmp_path):
    cfg = _config(volumes, tmp_path / "run", max_steps=1)
    cfg.clips.box_noise = 0.0
    model = sam2_clips.build_model(cfg, torch.device("cpu")).eval()
    with torch.no_grad():  # objects present, so that the masks are not all empty
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(8.0)
    case = _case(volumes)
    indices = [6, 5, 4, 3]  # a clip running down from slice 6
    clip = sam2_clips.make_clip(case, 1, indices, model, cfg, np.random.default_rng(0), "box")
    with torch.no_grad():
        outputs = sam2_clips.track_clip(model, clip, train_encoder=False)
    ys, xs = np.nonzero(case.labels[6] == 1)
    box = Box2D(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), slice=0)
    sub = case.slices[indices]  # the clip's slices in its order: tracked forward from slice 0
    expected = track_volume(model, sub, [box], fill_hole_area=0)
    contract = medsam.preprocess.get_contract(model.contract, model.input_size)
    geometry = contract.geometry(sub.shape[1:])
    ours = np.stack([(contract.mask_scores(o.low_res, geometry)[0, 0] > contract.threshold).numpy() for o in outputs])
    assert ours.any() and np.array_equal(ours, expected.labels == 1)
    assert [round(o.iou, 6) for o in outputs] == [round(expected.scores[0][k], 6) for k in range(4)]


def test_a_clip_never_leaves_its_first_slice_alone(volumes):
    case = _case(volumes)
    depth = case.labels.shape[0]
    starts = set()
    for seed in range(60):
        indices = sam2_clips.clip_slices(case, 1, 4, np.random.default_rng(seed))
        starts.add(indices[0])
        assert len(indices) >= 2 and all(abs(b - a) == 1 for a, b in itertools.pairwise(indices))
        assert all(0 <= k < depth for k in indices) and (case.labels[indices[0]] == 1).any()
        if indices[0] in (0, depth - 1):
            assert len(indices) == 4  # from an end slice the clip runs inwards
    assert {0, depth - 1} <= starts  # the end slices were drawn, and their clips run inwards


def test_corrections_click_in_the_error_and_the_slice_keeps_its_last_decoding(volumes, tmp_path):
    import torch.nn.functional as F

    cfg = _config(volumes, tmp_path / "run", max_steps=1)
    model = sam2_clips.build_model(cfg, torch.device("cpu")).eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(8.0)
    clip = sam2_clips.make_clip(_case(volumes), 1, [4, 5, 6], model, cfg, np.random.default_rng(0), "box")
    truth = clip.targets[1, 0] > 0.5
    base = sam2_clips.error_clicks(clip.targets[1:2], 3, np.random.default_rng(1))
    seen = []

    def recording(decode, heads):
        def spy(coords, labels, previous):
            # the newest click lies in the error of the prediction before it, labelled by its kind
            before = F.interpolate(previous.low_res, size=truth.shape, mode="bilinear", align_corners=False)[0, 0] > 0
            x, y = (int(v) for v in coords[0, -1])
            assert bool(before[y, x]) != bool(truth[y, x]) and int(labels[0, -1]) == int(truth[y, x])
            seen.append(coords.shape[1])
            return decode(coords, labels, previous)

        return base(spy, heads)

    with torch.no_grad():
        corrected = sam2_clips.track_clip(model, clip, False, {1: recording})
        plain = sam2_clips.track_clip(model, clip, False)
    assert seen == [1, 2, 3]  # the clicks accumulate
    out = corrected[1]
    assert len(out.corrections) == 3 and torch.equal(out.low_res, out.corrections[-1].low_res)
    assert torch.equal(corrected[0].low_res, plain[0].low_res)
    assert not torch.equal(corrected[2].low_res, plain[2].low_res)  # the next slice remembers the correction
    # the loss sums the losses of every decoding of the corrected slice
    import dataclasses

    goal = clip.targets[1:2]
    parts = [dataclasses.replace(out, heads=h, corrections=[]) for h in [out.heads, *out.corrections]]
    each = sum(float(sam2_clips.clip_loss([p], goal, cfg).total) for p in parts)
    assert abs(float(sam2_clips.clip_loss([out], goal, cfg).total) - each) < 1e-3 * each


def test_a_run_learns_and_its_export_tracks(volumes, tmp_path):
    cfg = _config(volumes, tmp_path / "run", max_steps=30, lr=1e-3, mode="decoder")
    case = _case(volumes)
    before = _fixed_clip_loss(sam2_clips.build_model(cfg, torch.device("cpu")).eval(), cfg, case)
    result = train(cfg)
    model = medsam.load_model(result.run_dir / "model.safetensors", device="cpu")
    assert type(model).__name__ == "SAM2Model" and model.config.img_size == 128 and model.contract == "sam2"
    after = _fixed_clip_loss(model, cfg, case)
    assert after["object"] < 0.1 * before["object"], (before, after)
    assert after["dice"] < before["dice"] - 0.3, (before, after)
    # the image encoder stayed as built (decoder mode); the rest moved
    initial = sam2_clips.build_model(cfg, torch.device("cpu")).state_dict()
    trained = model.state_dict()
    assert all(torch.equal(initial[k], trained[k]) for k in initial if k.startswith("image_encoder."))
    assert not torch.equal(
        initial["memory_attention.layers.0.self_attn.q_proj.weight"],
        trained["memory_attention.layers.0.self_attn.q_proj.weight"],
    )
    segmentation = track_volume(model, case.slices[3:9], [Box2D(150, 150, 250, 250, slice=2)])
    assert segmentation.labels.shape == (6, 350, 512)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(volumes, tmp_path, monkeypatch):
    straight = train(_config(volumes, tmp_path / "straight", max_steps=4, mode="full"))
    # a run that crashes in its 4th step (latest.pt of step 2), resumed
    real, calls = sam2_clips.clip_loss, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("crash")
        return real(*args)

    monkeypatch.setattr(sam2_clips, "clip_loss", crashing)
    with pytest.raises(RuntimeError, match="crash"):
        train(_config(volumes, tmp_path / "split", max_steps=4, mode="full", save_every=2))
    monkeypatch.setattr(sam2_clips, "clip_loss", real)
    assert torch.load(tmp_path / "split" / "latest.pt", weights_only=True)["step"] == 2
    resumed = train(_config(volumes, tmp_path / "split", max_steps=4, mode="full", resume="auto"))
    assert resumed.global_step == 4
    a = medsam.load_model(straight.run_dir / "model.safetensors").state_dict()
    b = medsam.load_model(resumed.run_dir / "model.safetensors").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    rows = (resumed.run_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    initial = sam2_clips.build_model(_config(volumes, tmp_path / "x", max_steps=1), torch.device("cpu")).state_dict()
    weight = "image_encoder.trunk.patch_embed.proj.weight"
    assert not torch.equal(initial[weight], a[weight])  # full mode trains the encoder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clips": {"volumes": None}}, "trains on clips.volumes"),
        ({"train": {"mode": "lora"}}, "train.mode must be one of full, decoder"),
        ({"model": {"arch": "vit_b"}}, "clips.volumes trains a SAM2-family model"),
        ({"clips": {"frames": 1}}, "clips.frames must be >= 2"),
        ({"clips": {"prompts": ["box", "scribble"]}}, "clips.prompts"),
        ({"clips": {"window": "nowhere"}}, "clips.window: unknown CT window"),
        ({"loss": {"kind": "dice_bce"}}, "loss.kind must be one of focal_dice"),
        ({"clips": {"correction_clicks": -1}}, "clips.correction_frames and clips.correction_clicks"),
    ],
)
def test_clip_settings_are_checked(changes, message):
    data = {
        "model": {"arch": "sam2.1_hiera_tiny", "config_overrides": TINY},
        "clips": {"volumes": "somewhere"},
        "train": {"max_steps": 1},
    }
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_a_checkpoint_of_another_family_is_refused(volumes, tmp_path):
    from medsam.model.registry import CONFIGS, build_model
    from medsam.weights import save_model

    path = tmp_path / "lite.safetensors"
    save_model(build_model(CONFIGS["vit_tiny"]), path)
    cfg = TrainConfig.from_dict(
        {
            "model": {"arch": None, "checkpoint": str(path)},
            "clips": {"volumes": str(volumes)},
            "train": {"max_steps": 1},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    with pytest.raises(ValueError, match="not a SAM2-family one"):
        train(cfg)


def test_two_ranks_train_on_two_clips_with_averaged_gradients(volumes, tmp_path):
    """torchrun with 2 ranks on gloo, one step: the weights every rank ends with are those of one
    AdamW step on the mean of the two ranks' clip gradients, computed here in one process."""
    import subprocess
    import sys

    import yaml

    settings = {
        "model": {"arch": "sam2.1_hiera_tiny", "config_overrides": TINY},
        "clips": {"volumes": str(volumes), "frames": 3, "labels": [1, 5]},
        "train": {"max_steps": 1, "warmup_steps": 0, "lr": 1e-3, "mode": "decoder", "device": "cpu"},
        "output": {"dir": str(tmp_path / "ddp"), "tensorboard": False},
    }
    config_path = tmp_path / "clips.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "medsam", "train", str(config_path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = medsam.load_model(tmp_path / "ddp" / "model.safetensors").state_dict()

    # one thread, as the ranks had: AdamW's first step divides each gradient by its own size,
    # so the last bits of a tiny gradient decide its parameter's step
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _one_step_on_the_mean_gradient(settings, volumes, tmp_path / "here")
    finally:
        torch.set_num_threads(threads)
    for name, tensor in expected.items():
        assert torch.allclose(trained[name], tensor, atol=1e-6), name
    assert not torch.equal(
        trained["memory_attention.layers.0.self_attn.q_proj.weight"],
        sam2_clips.build_model(TrainConfig.from_dict(settings), torch.device("cpu")).state_dict()[
            "memory_attention.layers.0.self_attn.q_proj.weight"
        ],
    )


def _one_step_on_the_mean_gradient(settings: dict, volumes: Path, out: Path) -> dict[str, torch.Tensor]:
    from medsam.train.distributed import DistInfo
    from medsam.train.step_run import StepRun

    cfg = TrainConfig.from_dict({**settings, "output": {"dir": str(out)}})
    model = sam2_clips.build_model(cfg, torch.device("cpu")).train()
    parameters = sam2_clips.trainable_parameters(model, "decoder")
    case = sam2_clips.load_case(volumes / "images" / "ct.nii.gz", volumes / "labels" / "ct.nii.gz", [1, 5], None, None)
    gradients = []
    for rank in (0, 1):
        run = StepRun(cfg, sam2_clips.KIND, DistInfo(rank=rank, world_size=2))
        rng, drawn, value = run.draw([case])
        clip = sam2_clips.make_clip(drawn, value, sam2_clips.clip_slices(drawn, value, 3, rng), model, cfg, rng)
        model.zero_grad(set_to_none=True)
        outputs = sam2_clips.track_clip(model, clip, False, sam2_clips.plan_corrections(clip, cfg, rng))
        sam2_clips.clip_loss(outputs, clip.targets, cfg).total.backward()
        gradients.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in parameters])
    # The ranks drew different clips (the draw is keyed by rank): otherwise the mean would equal
    # either rank's gradient, and the comparison could not see a missing average.
    assert any(not torch.equal(g0, g1) for g0, g1 in zip(*gradients, strict=True))
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=cfg.train.weight_decay)
    for p, g0, g1 in zip(parameters, *gradients, strict=True):
        p.grad = (g0 + g1) / 2
    optimizer.step()
    return model.state_dict()
