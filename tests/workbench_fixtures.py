"""Fixtures of the workbench tests, shared by the modules that test the server (a pytest plugin
loaded by conftest.py): ``model`` (the seeded vit_tiny, once per module) and ``data`` (a data folder
with a PNG, a PNG in a subfolder, a small CT-like NIfTI volume, and a file outside it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import smooth_image


def _model():
    from medsam.model import build_model

    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture
def data(tmp_path):
    """A data folder with a 2D PNG, a small CT-like NIfTI volume and a file outside it."""
    import SimpleITK as sitk
    from PIL import Image

    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(smooth_image(64, 80, seed=1)).save(root / "a.png")
    (root / "sub").mkdir()
    Image.fromarray(smooth_image(48, 48, seed=2)).save(root / "sub" / "b.png")
    vol = np.stack([smooth_image(40, 48, seed=3 + s) for s in range(5)]).astype(np.int16) * 4 - 500
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    sitk.WriteImage(img, str(root / "vol.nii.gz"))
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(smooth_image(32, 32, seed=9)).save(outside / "secret.png")
    return root
