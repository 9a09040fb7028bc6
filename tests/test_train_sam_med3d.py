"""SAM-Med3D fine-tuning through ``medsam train`` (model.arch: sam_med3d), tiny, on the CPU."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from medsam.model.sam_med3d import SamMed3DModel
from medsam.train.config import ConfigError, load_config

TINY = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": [1],
    "window_size": 3,
    "prompt_embed_dim": 48,
}


def _write_cases(root, n=3):
    """Volumes of noise with two bright ellipsoids (labels 1 and 2), 1.5 mm voxels."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:30, :40, :40]
    for i in range(n):
        image = rng.normal(0, 20, (30, 40, 40)) + 100
        labels = np.zeros((30, 40, 40), np.uint8)
        for value, (cz, cy, cx, r) in enumerate(((12 + i, 15, 14, 6), (18, 27 - i, 26, 4)), start=1):
            inside = ((zz - cz) / r) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / (r + 2)) ** 2 <= 1
            labels[inside] = value
            image[inside] += 300 * value
        for array, folder, name in (
            (image.astype(np.int16), "imagesTr", f"case{i}_0000"),
            (labels, "labelsTr", f"case{i}"),
        ):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing((1.5, 1.5, 1.5))
            sitk.WriteImage(img, str(root / folder / f"{name}.nii.gz"))


def _config(tmp_path, run, steps, **train):
    cfg = {
        "model": {"arch": "sam_med3d", "config_overrides": TINY},
        "train": {"max_steps": steps, "lr": 1e-3, "save_every": 10, "log_every": 5, "seed": 3, **train},
        "med3d": {"volumes": str(tmp_path / "data"), "clicks": 2, "shift": 2},
        "output": {"dir": str(tmp_path / run), "tensorboard": False},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fixed_loss(model, data_dir):
    """The interaction loss of one fixed sample (case 0, label 1, fixed clicks)."""
    from medsam.train.sam_med3d import find_pairs, interaction_loss, load_volume, sample_cube

    image, label = find_pairs(data_dir)[0]
    case = load_volume(image, label, model.config, None)
    rng = np.random.default_rng(99)
    cube, target = sample_cube(case, 1, model.config.img_size, 0, rng)
    with torch.no_grad():
        return float(interaction_loss(model, model.embed_image(cube[None, None]), target, 2, rng))


def test_fine_tuning_learns_resumes_exactly_and_exports_a_loadable_model(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_cases(data)
    from medsam.train.loop import train
    from medsam.weights import load_model

    untrained = train(load_config(_config(tmp_path, "zero", 1, lr=1e-12)))
    before = _fixed_loss(load_model(untrained.run_dir / "model.safetensors"), data)

    straight = train(load_config(_config(tmp_path, "straight", 40)))
    assert straight.global_step == 40
    trained = load_model(straight.run_dir / "model.safetensors")
    assert isinstance(trained, SamMed3DModel)
    assert trained.config.img_size == 32 and trained.config.depth == 2
    assert _fixed_loss(trained, data) < 0.8 * before

    # a run that crashes at step 25 (latest.pt of step 20), resumed: the same weights as the
    # uninterrupted run
    import medsam.train.sam_med3d as trainer

    class Crash(RuntimeError):
        pass

    calls = []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 25:
            raise Crash
        return real(*args)

    real = trainer.interaction_loss
    monkeypatch.setattr(trainer, "interaction_loss", crashing)
    with pytest.raises(Crash):
        train(load_config(_config(tmp_path, "split", 40)))
    monkeypatch.setattr(trainer, "interaction_loss", real)
    assert torch.load(tmp_path / "split" / "latest.pt", weights_only=True)["step"] == 20
    resumed = train(load_config(_config(tmp_path, "split", 40, resume="auto")))
    assert resumed.global_step == 40
    again = load_model(resumed.run_dir / "model.safetensors")
    for (name, a), b in zip(trained.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    rows = (resumed.run_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10", "15", "20", "25", "30", "35", "40"]

    # the exported model segments a volume from voxel clicks through the command line
    out = tmp_path / "seg.nii.gz"
    cmd = [sys.executable, "-m", "medsam", "segment", str(data / "imagesTr" / "case0_0000.nii.gz")]
    cmd += ["--checkpoint", str(straight.run_dir / "model.safetensors"), "--point", "14", "15", "12", "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).shape == (30, 40, 40)


def test_sam_med3d_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"med3d\.volumes"):
        load_config(None, ["model.arch=sam_med3d", "train.max_steps=1"])
    with pytest.raises(ConfigError, match=r"train\.mode"):
        load_config(None, ["model.arch=sam_med3d", "train.max_steps=1", "train.mode=lora", f"med3d.volumes={tmp_path}"])
    with pytest.raises(ConfigError, match="contract"):
        load_config(
            None, ["model.arch=sam_med3d", "train.max_steps=1", "model.contract=lite", f"med3d.volumes={tmp_path}"]
        )
