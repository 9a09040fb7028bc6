"""Checkpoint formats: official state dicts, training checkpoints, DDP prefixes, safetensors,
shape-inferred architectures, and refusal of malicious pickles and wrong checkpoints."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import medsam
from medsam.model import CONFIGS, ModelConfig, build_model
from medsam.weights import CheckpointError, infer_config, read_state_dict


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_plain_state_dict(tmp_path, tiny_model):
    path = tmp_path / "plain.pth"
    torch.save(tiny_model.state_dict(), path)
    loaded = medsam.load_model(path, device="cpu")
    assert loaded.config.name == "vit_tiny"
    _same_weights(loaded, tiny_model)


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_training_checkpoint_with_module_prefix(tmp_path, tiny_model, key):
    path = tmp_path / "train.pth"
    state = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({key: state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7}, path)
    _same_weights(medsam.load_model(path, device="cpu"), tiny_model)


def test_safetensors_round_trip_keeps_config_and_contract(tmp_path, tiny_model):
    tiny_model.contract = "sam"
    path = medsam.save_model(tiny_model, tmp_path / "out" / "model.safetensors")
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = medsam.load_model(path, device="cpu")
    assert loaded.contract == "sam"
    assert loaded.config == tiny_model.config
    _same_weights(loaded, tiny_model)
    # The user can override the stored contract.
    assert medsam.load_model(path, contract="medsam", device="cpu").contract == "medsam"
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_foreign_safetensors_infers_architecture(tmp_path, tiny_model):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    loaded = medsam.load_model(path, device="cpu")
    assert loaded.config.name == "vit_tiny"
    _same_weights(loaded, tiny_model)


def test_architecture_inferred_from_shapes_for_unregistered_vit(tmp_path):
    cfg = ModelConfig(
        "mine",
        img_size=128,
        embed_dim=64,
        depth=3,
        num_heads=4,
        global_attn_indexes=(2,),
        window_size=4,
        embedding_size=8,
    )
    torch.manual_seed(1)
    model = build_model(cfg)
    inferred = infer_config(model.state_dict())
    assert (inferred.img_size, inferred.embed_dim, inferred.depth, inferred.num_heads) == (128, 64, 3, 4)
    assert inferred.global_attn_indexes == (2,) and inferred.window_size == 4 and inferred.embedding_size == 8
    path = tmp_path / "custom.pth"
    torch.save(model.state_dict(), path)
    _same_weights(medsam.load_model(path, device="cpu"), model)


def test_official_vit_shapes_are_recognised():
    # Shapes only (meta tensors): the registry configs are recovered from their own state dicts.
    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            model = build_model(name)
        assert infer_config(model.state_dict()).name == name


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, monkeypatch, writer):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": _Exploit()}, f)
    else:
        torch.save({"model": {"w": torch.zeros(1)}, "hook": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        medsam.load_model(path, device="cpu")
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_wrong_kind_of_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a SAM/MedSAM checkpoint"):
        medsam.load_model(path, device="cpu")


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_model):
    state = tiny_model.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["mask_decoder.extra_head.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        medsam.load_model(path, config="vit_tiny", device="cpu")
    text = str(info.value)
    assert "mask_decoder.iou_token.weight" in text and "mask_decoder.extra_head.weight" in text


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json}")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad_st)


def test_lite_state_dict_is_recognised(tmp_path):
    torch.manual_seed(0)
    lite = build_model("lite")
    path = tmp_path / "lite_medsam.pth"
    torch.save({"model": lite.state_dict()}, path)
    loaded = medsam.load_model(path, device="cpu")
    assert loaded.config.name == "lite" and loaded.contract == "lite"
    _same_weights(loaded, lite)
    assert CONFIGS["lite"].img_size == 256
