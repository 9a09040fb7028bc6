"""The embedded default model: found and loaded without arguments (its quality: docs/model-card.md)."""

from __future__ import annotations

import pytest

import medsam
from medsam.default_model import bundled_checkpoint


def test_default_model_is_bundled_and_loads():
    path = bundled_checkpoint()
    if path is None:
        pytest.skip("no trained default model in this installation")
    assert path.stat().st_size <= 20 * 2**20
    model = medsam.load_model(device="cpu")
    assert model.config.name == "lite" and model.contract == "lite"
    assert not getattr(model, "is_untrained_default", False)
    # no calibrated mask threshold is shipped (docs/model-card.md): masks at the contract's 0.5
    assert model.mask_threshold is None and medsam.Predictor(model).contract.threshold == 0.5
