"""Encoder distillation (``medsam train`` with ``train.mode: distill``): a small TinyViT student
learns a ViT teacher's embeddings on held-out slices, from precomputed teacher embeddings."""

from __future__ import annotations

import csv

import pytest
import torch

from medsam.model import build_model
from medsam.train.config import ConfigError, load_config
from medsam.train.synthetic import write_synthetic_corpus
from medsam.weights import load_model, save_model

STUDENT = (
    "model.config_overrides={img_size: 64, embedding_size: 16, tiny_embed_dims: [16, 32, 48, 64], "
    "tiny_depths: [1, 1, 1, 1], tiny_num_heads: [1, 2, 3, 4]}"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), cases={"train": 4, "val": 2}, slices_per_case=4)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model("vit_tiny").eval(), tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


def _overrides(corpus, teacher, out, *extra):
    return [
        "model.arch=lite",
        STUDENT,
        "train.mode=distill",
        f"distill.teacher={teacher}",
        f"data.corpus={corpus}",
        f"output.dir={out}",
        "data.batch_size=4",
        "train.lr=3e-3",
        "train.progress=false",
        "output.tensorboard=false",
        "train.log_every=10",
        *extra,
    ]


def test_the_student_approaches_the_teacher_on_held_out_slices(corpus, teacher, tmp_path):
    from medsam.train.loop import train

    result = train(load_config(None, _overrides(corpus, teacher, tmp_path / "run", "train.max_steps=60")))
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        val = [float(r["rel_err"]) for r in csv.DictReader(f) if r["split"] == "val"]
    before, after = val
    print(f"held-out relative L2 error: {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before
    assert result.metrics["val_rel_err"] == pytest.approx(after, rel=1e-3)
    # the teacher's embeddings were computed once into the store and read back
    assert (tmp_path / "run" / "teacher_embeddings" / "part-000000.f16").is_file()

    student = load_model(tmp_path / "run" / "model.safetensors")
    t = load_model(teacher)
    assert student.config.encoder == "tiny_vit"
    for a, b in zip(student.mask_decoder.state_dict().values(), t.mask_decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the student starts its decoder from the teacher's


@pytest.fixture
def restore_determinism():
    """train.deterministic switches PyTorch's process-wide setting: put it back afterwards."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_a_distillation_resumes_where_it_stopped(corpus, teacher, tmp_path, monkeypatch, restore_determinism):
    """With train.deterministic (TinyViT's attention-bias gradient is otherwise summed in any
    order), a run stopped at step 10 and resumed from latest.pt (step 8) ends as the straight one."""
    import medsam.train.distill as distill
    from medsam.train.loop import train

    straight = train(
        load_config(None, _overrides(corpus, teacher, tmp_path / "a", "train.max_steps=12", "train.deterministic=true"))
    )

    class Stop(RuntimeError):
        pass

    real = distill.F.mse_loss
    calls = []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(distill.F, "mse_loss", stopping)
    with pytest.raises(Stop):
        train(
            load_config(None, _overrides(corpus, teacher, tmp_path / "b", "train.max_steps=12", "train.save_every=4"))
        )
    monkeypatch.setattr(distill.F, "mse_loss", real)
    resumed = train(
        load_config(
            None,
            _overrides(
                corpus, teacher, tmp_path / "b", "train.max_steps=12", "train.resume=auto", "train.deterministic=true"
            ),
        )
    )
    a = load_model(straight.run_dir / "model.safetensors").state_dict()
    b = load_model(resumed.run_dir / "model.safetensors").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), (key, (a[key] - b[key]).abs().max())


def test_distillation_settings_are_checked(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        load_config(None, ["model.arch=lite", "train.mode=distill", "train.max_steps=1"])
    from medsam.train.loop import train

    torch.manual_seed(0)
    wide = save_model(build_model("vit_tiny"), tmp_path / "t.safetensors")
    bad = _overrides(corpus, wide, tmp_path / "c", "train.max_steps=1").copy()
    bad[1] = STUDENT.replace("embedding_size: 16", "embedding_size: 8").replace("img_size: 64", "img_size: 32")
    with pytest.raises(ValueError, match="embeddings"):
        train(load_config(None, bad))
