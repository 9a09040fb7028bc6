"""Fixtures and helpers of the workbench tests, shared by the modules that test the server (a
pytest plugin loaded by conftest.py): ``model`` (the seeded vit_tiny, once per module), ``data`` (a
data folder with a PNG, a PNG in a subfolder, a small CT-like NIfTI volume, and a file outside
it), :func:`client` (an in-process client on the loopback name the server accepts) and
:func:`rle_mask` (a mask as the API's RLE body)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import seeded_tiny_model, smooth_image

BASE = "http://127.0.0.1"
TOKEN = "s3cret-token-for-tests"


def client(app, **kwargs):
    """A ``fastapi.testclient.TestClient`` on ``app`` at :data:`BASE`."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=BASE, **kwargs)


def rle_mask(mask: np.ndarray) -> dict:
    """``mask`` as the API's RLE mask body (shape, values, counts)."""
    from medsam.server.encoding import rle_encode

    values, counts = rle_encode(mask.astype(np.uint8))
    return {"shape": list(mask.shape), "values": values, "counts": counts}


@pytest.fixture(scope="module")
def model():
    return seeded_tiny_model()


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
