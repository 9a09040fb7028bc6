"""A model's calibrated mask threshold (``Contract.mask_threshold``): kept in its checkpoint,
applied by the Predictor on whole images and zoomed crops and by the ONNX export, shown by
``medsam info``, refused when invalid, and dropped by training (it belongs to the weights)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import medsam
from conftest import smooth_image
from medsam.preprocess import Contract, get_contract
from medsam.weights import CheckpointError, load_model, save_model

BOXES = [[8, 10, 110, 86], [60, 40, 72, 52]]  # the second is small: segmented on a zoomed crop


def test_contract_threshold_defaults_and_bounds():
    assert get_contract("lite", 256).threshold == 0.5 and get_contract("medsam", 1024).threshold == 0.5
    assert get_contract("sam", 1024).threshold == 0.0 and get_contract("sam", 1024).mask_threshold is None
    assert get_contract("lite", 256, 0.3).threshold == 0.3
    assert get_contract("sam", 1024, -1.5).threshold == -1.5  # logits: any finite value
    for bad in (0.0, 1.0, 1.5, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match="threshold"):
            Contract("lite", 256, bad)


@pytest.fixture
def calibrated(tmp_path, tiny_model):
    tiny_model.mask_threshold = 0.3
    return save_model(tiny_model, tmp_path / "calibrated.safetensors")


def test_checkpoint_keeps_the_threshold_and_the_predictor_applies_it(calibrated):
    model = load_model(calibrated)
    assert model.mask_threshold == 0.3
    assert load_model(calibrated, contract="sam").mask_threshold is None  # another contract: its own standard
    image = smooth_image(96, 128)
    predictor = medsam.Predictor(model, zoom=True)
    predictor.set_image(image)
    got = predictor.predict(boxes=BOXES)
    assert predictor.contract.threshold == 0.3 and got.zoomed.tolist() == [False, True]
    standard = medsam.Predictor(model, zoom=True, mask_threshold=0.5)
    standard.set_image(image)
    plain = standard.predict(boxes=BOXES)
    np.testing.assert_array_equal(got.low_res_logits, plain.low_res_logits)  # the same network output
    for i in range(len(BOXES)):
        np.testing.assert_array_equal(got.masks[i], got.score_maps(i)[0] > 0.3)
        np.testing.assert_array_equal(plain.masks[i], plain.score_maps(i)[0] > 0.5)
        assert got.masks[i].sum() > plain.masks[i].sum()  # a lower threshold: larger masks


def test_invalid_stored_threshold_is_refused(tmp_path, tiny_model):
    tiny_model.mask_threshold = 1.5  # probabilities are thresholded inside (0, 1)
    path = save_model(tiny_model, tmp_path / "bad.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["mask_threshold"] == 1.5
    with pytest.raises(CheckpointError, match="mask_threshold"):
        load_model(path)


def test_training_drops_the_threshold_and_info_shows_it(calibrated, capsys):
    from medsam.cli import main
    from medsam.train.trainable import build_initial_model

    section = types.SimpleNamespace(checkpoint=str(calibrated), contract=None, config_overrides={}, arch=None)
    assert build_initial_model(section, seed=0).mask_threshold is None
    assert main(["info", str(calibrated)]) == 0
    assert "mask threshold 0.3 (calibrated)" in capsys.readouterr().out


def test_onnx_export_carries_the_threshold(calibrated, tmp_path):
    from medsam.export import export_onnx
    from medsam.export.contract import check_contract_spec
    from medsam.export.runtime import OnnxPredictor

    model = load_model(calibrated)
    result = export_onnx(model, tmp_path / "onnx", points_decoder=False, verify=False)
    spec = json.loads(result.metadata.read_text())["contract"]
    assert spec["mask"]["threshold"] == 0.3 and spec["mask"]["rule"].endswith("> 0.3")
    onnx = OnnxPredictor(tmp_path / "onnx", zoom=True)
    assert onnx.contract.threshold == 0.3
    onnx.set_image(smooth_image(96, 128))
    got = onnx.predict(boxes=BOXES)
    for i in range(len(BOXES)):
        np.testing.assert_array_equal(got.masks[i], got.score_maps(i)[0] > 0.3)
    edited = {**spec, "mask": {**spec["mask"], "threshold": 0.4}}  # the rule still says 0.3
    with pytest.raises(ValueError, match="differs"):
        check_contract_spec(edited)
