"""Fixtures and helpers of the workbench tests, shared by the modules that test the server (a
pytest plugin loaded by conftest.py): ``model`` (the seeded vit_tiny, once per module), ``data`` (a
data folder with a PNG, a PNG in a subfolder, a small CT-like NIfTI volume, and a file outside
it), :func:`client` (an in-process client on the loopback name the server accepts) and
:func:`rle_mask` (a mask as the API's RLE body)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from conftest import seeded_tiny_model, smooth_image

BASE = "http://127.0.0.1"
TOKEN = "s3cret-token-for-tests"


def client(app, **kwargs):
    """A ``fastapi.testclient.TestClient`` on ``app`` at :data:`BASE`."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=BASE, **kwargs)


@contextlib.contextmanager
def live_server(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        assert thread.is_alive() and time.time() - t0 < 30, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def synthetic_ct(Z: int = 7, H: int = 96, W: int = 112, seed: int = 0):
    """A CT-like int16 volume in HU (air, a body ellipse, a bright ellipsoid 'organ') and the organ mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:Z, 0:H, 0:W].astype(np.float32)
    vol = np.full((Z, H, W), -1000.0, np.float32)
    vol[((y - H / 2) / (H * 0.45)) ** 2 + ((x - W / 2) / (W * 0.45)) ** 2 <= 1] = 40
    organ = ((z - Z / 2) / (Z * 0.45)) ** 2 + ((y - H * 0.45) / (H * 0.2)) ** 2 + (
        (x - W * 0.42) / (W * 0.18)
    ) ** 2 <= 1
    vol[organ] = 160
    vol += rng.normal(0, 12, vol.shape)
    return np.round(vol).astype(np.int16), organ


def write_synthetic_ct(folder, name: str = "ct.nii.gz"):
    """:func:`synthetic_ct` written as NIfTI with a spacing, an origin and a permuted direction
    (so that a mix-up of axes or of voxel and world coordinates shows); returns the organ mask."""
    import SimpleITK as sitk

    vol, organ = synthetic_ct()
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetOrigin((-40.0, 25.0, 100.0))
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(folder / name))
    return organ


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
