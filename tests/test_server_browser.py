"""End to end in a real headless Chromium: open the workbench page, draw a box, see the mask,
accept, and find the label file on disk with the image's geometry.

Needs the ``serve`` extra, Playwright's Python package and a Chromium binary (Debian:
``apt-get install chromium``; ``MEDSAM_CHROMIUM`` may name another path). Playwright's own browser
download is never used. Skipped cleanly when any of these is missing.
Set ``MEDSAM_SCREENSHOT=path.png`` to keep a screenshot of the page after the box.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("MEDSAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM or not Path(CHROMIUM).exists():
    pytest.skip("no Chromium binary (apt-get install chromium, or set MEDSAM_CHROMIUM)", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
TOKEN = "browser-test-token"


def synthetic_ct(Z: int = 7, H: int = 96, W: int = 112, seed: int = 0):
    """A CT-like int16 volume in HU (air, a body ellipse, a bright ellipsoid 'organ') and the organ mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:Z, 0:H, 0:W].astype(np.float32)
    vol = np.full((Z, H, W), -1000.0, np.float32)
    vol[((y - H / 2) / (H * 0.45)) ** 2 + ((x - W / 2) / (W * 0.45)) ** 2 <= 1] = 40
    organ = ((z - Z / 2) / (Z * 0.45)) ** 2 + ((y - H * 0.45) / (H * 0.2)) ** 2 + ((x - W * 0.42) / (W * 0.18)) ** 2 <= 1
    vol[organ] = 160
    vol += rng.normal(0, 12, vol.shape)
    return np.round(vol).astype(np.int16), organ


@pytest.fixture
def served(tmp_path):
    """The workbench (embedded default model, with a token) on a free localhost port."""
    import SimpleITK as sitk

    import medsam
    from medsam.server import create_app

    data = tmp_path / "data"
    data.mkdir()
    vol, organ = synthetic_ct()
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetOrigin((-40.0, 25.0, 100.0))
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(data / "ct.nii.gz"))
    model = medsam.load_model(device="cpu")
    app = create_app(data, model=model, token=TOKEN)
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
        yield f"http://127.0.0.1:{port}", data, organ
    finally:
        server.should_exit = True
        thread.join(10)


def test_box_mask_accept_in_chromium(served):
    from medsam.io import read_image

    url, data, organ = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/#token={TOKEN}")  # the fragment never reaches the server
            page.click('#image-list li[data-id="ct.nii.gz"]', timeout=30_000)
            page.wait_for_selector("#canvas[data-slice]", timeout=30_000)
            page.select_option("#window-select", "soft_tissue")  # a CT preset for display
            k = int(page.get_attribute("#canvas", "data-slice"))
            assert k == organ.shape[0] // 2
            ys, xs = np.nonzero(organ[k])
            x0, y0, x1, y1 = xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3
            rect = page.locator("#canvas").bounding_box()
            zoom = rect["width"] / organ.shape[2]
            page.mouse.move(rect["x"] + (x0 + 0.5) * zoom, rect["y"] + (y0 + 0.5) * zoom)
            page.mouse.down()
            page.mouse.move(rect["x"] + (x1 + 0.5) * zoom, rect["y"] + (y1 + 0.5) * zoom, steps=8)
            page.mouse.up()
            page.wait_for_selector("#canvas[data-mask-area]", timeout=60_000)
            area = int(page.get_attribute("#canvas", "data-mask-area"))
            assert area > 0.5 * organ[k].sum()
            assert "predicted IoU" in page.text_content("#status")
            # the mask is drawn: the organ's centre is tinted in label 1's colour (red)
            cy, cx = int(ys.mean()), int(xs.mean())
            r, g, b, _ = page.evaluate(
                "([x, y]) => Array.from(document.querySelector('#canvas').getContext('2d').getImageData(x, y, 1, 1).data)",
                [int((cx + 0.5) * zoom), int((cy + 0.5) * zoom)],
            )
            assert r > g + 40 and r > b + 20, (r, g, b)
            shot = os.environ.get("MEDSAM_SCREENSHOT")
            if shot:
                page.screenshot(path=shot)
            # Tab cycles through the proposal and the decoder's three alternatives, back to the first
            assert "proposal 1/4" in page.text_content("#status")
            areas = [area]
            for j in (1, 2, 3, 0):
                page.keyboard.press("Tab")
                page.wait_for_selector(f'#canvas[data-candidate="{j}"]', timeout=5_000)
                assert f"proposal {j + 1}/4" in page.text_content("#status")
                areas.append(int(page.get_attribute("#canvas", "data-mask-area")))
            assert areas[-1] == area and len(set(areas)) > 1  # the alternatives differ
            page.keyboard.press("Enter")
            page.wait_for_selector('#canvas[data-saved-version="1"]', timeout=30_000)
            assert "version 1" in page.text_content("#status")
            assert errors == []
        finally:
            browser.close()

    image = read_image(data / "ct.nii.gz")
    label = read_image(data / ".medsam" / "labels" / "ct.nii.gz")
    assert label.array.shape == image.array.shape
    assert np.allclose(label.spacing, image.spacing) and np.allclose(label.origin, image.origin)
    assert np.allclose(label.direction, image.direction)
    saved = label.array > 0
    assert saved[np.arange(saved.shape[0]) != k].sum() == 0
    dice = 2 * (saved[k] & organ[k]).sum() / (saved[k].sum() + organ[k].sum())
    assert dice > 0.8, dice
    side = json.loads((data / ".medsam" / "labels" / "ct.nii.gz.json").read_text())
    assert side["history"][0]["prompts"][0]["candidate"] == 0


def test_scribble_tool_in_chromium(served):
    """The scribble tool: a left-drag inside the organ is sent as a stroke (its vertices in the
    saved provenance), the saved mask covers the stroke's pixels."""

    url, data, organ = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/#token={TOKEN}")
            page.click('#image-list li[data-id="ct.nii.gz"]', timeout=30_000)
            page.wait_for_selector("#canvas[data-slice]", timeout=30_000)
            k = int(page.get_attribute("#canvas", "data-slice"))
            page.keyboard.press("s")
            assert "active" in page.get_attribute('#tools .tool[data-tool="scribble"]', "class")
            ys, xs = np.nonzero(organ[k])
            cy = int(np.median(ys))
            row = xs[ys == cy]
            xa, xb = int(row.min()) + 4, int(row.max()) - 4
            rect = page.locator("#canvas").bounding_box()
            zoom = rect["width"] / organ.shape[2]
            page.mouse.move(rect["x"] + (xa + 0.5) * zoom, rect["y"] + (cy + 0.5) * zoom)
            page.mouse.down()
            page.mouse.move(rect["x"] + (xb + 0.5) * zoom, rect["y"] + (cy + 0.5) * zoom, steps=10)
            page.mouse.up()
            page.wait_for_selector("#canvas[data-mask-area]", timeout=60_000)
            assert int(page.get_attribute("#canvas", "data-mask-area")) > 0
            page.keyboard.press("Enter")
            page.wait_for_selector('#canvas[data-saved-version="1"]', timeout=30_000)
            assert errors == []
        finally:
            browser.close()
    side = json.loads((data / ".medsam" / "labels" / "ct.nii.gz.json").read_text())
    prompt = side["history"][0]["prompts"][0]
    assert prompt.get("box") is None and not prompt.get("points")
    (stroke,) = prompt["scribbles"]
    assert stroke["positive"] is True and len(stroke["points"]) >= 3
    assert {v["y"] for v in stroke["points"]} == {cy}
    assert min(v["x"] for v in stroke["points"]) == xa and max(v["x"] for v in stroke["points"]) == xb
    from medsam.io import read_image

    saved = read_image(data / ".medsam" / "labels" / "ct.nii.gz").array[k] > 0
    assert saved[cy, xa : xb + 1].mean() > 0.9  # the mask covers the stroke


def test_kept_proposal_is_saved_in_chromium(served):
    """Tab to the third proposal and accept: the saved mask is that proposal (its area), and the
    provenance records it (candidate 2, its predicted IoU)."""
    from medsam.io import read_image

    url, data, organ = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/#token={TOKEN}")
            page.click('#image-list li[data-id="ct.nii.gz"]', timeout=30_000)
            page.wait_for_selector("#canvas[data-slice]", timeout=30_000)
            k = int(page.get_attribute("#canvas", "data-slice"))
            ys, xs = np.nonzero(organ[k])
            x0, y0, x1, y1 = xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3
            rect = page.locator("#canvas").bounding_box()
            zoom = rect["width"] / organ.shape[2]
            page.mouse.move(rect["x"] + (x0 + 0.5) * zoom, rect["y"] + (y0 + 0.5) * zoom)
            page.mouse.down()
            page.mouse.move(rect["x"] + (x1 + 0.5) * zoom, rect["y"] + (y1 + 0.5) * zoom, steps=8)
            page.mouse.up()
            page.wait_for_selector('#canvas[data-candidate="0"]', timeout=60_000)
            page.keyboard.press("Tab")
            page.keyboard.press("Tab")
            page.wait_for_selector('#canvas[data-candidate="2"]', timeout=5_000)
            area = int(page.get_attribute("#canvas", "data-mask-area"))
            status = page.text_content("#status")
            assert "proposal 3/4" in status
            page.keyboard.press("Enter")
            page.wait_for_selector('#canvas[data-saved-version="1"]', timeout=30_000)
            assert errors == []
        finally:
            browser.close()
    saved = read_image(data / ".medsam" / "labels" / "ct.nii.gz").array > 0
    assert saved[k].sum() == area and saved.sum() == area
    prompt = json.loads((data / ".medsam" / "labels" / "ct.nii.gz.json").read_text())["history"][0]["prompts"][0]
    assert prompt["candidate"] == 2
    assert f"predicted IoU {prompt['score']:.3f}" in status


def test_corrections_send_no_mask_prompt_to_medsam_models_in_chromium(served):
    """With the embedded LiteMedSAM (contract lite) a correction click is sent with the box and
    the clicks but without the previous logits handle (these models never saw mask prompts)."""
    url, data, organ = served
    bodies: list[dict] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/segment") else None)
            page.goto(f"{url}/#token={TOKEN}")
            page.click('#image-list li[data-id="ct.nii.gz"]', timeout=30_000)
            page.wait_for_selector("#canvas[data-slice]", timeout=30_000)
            k = int(page.get_attribute("#canvas", "data-slice"))
            ys, xs = np.nonzero(organ[k])
            x0, y0, x1, y1 = xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3
            rect = page.locator("#canvas").bounding_box()
            zoom = rect["width"] / organ.shape[2]
            page.mouse.move(rect["x"] + (x0 + 0.5) * zoom, rect["y"] + (y0 + 0.5) * zoom)
            page.mouse.down()
            page.mouse.move(rect["x"] + (x1 + 0.5) * zoom, rect["y"] + (y1 + 0.5) * zoom, steps=8)
            page.mouse.up()
            page.wait_for_selector('#canvas[data-candidate="0"]', timeout=60_000)
            page.keyboard.press("p")
            cx, cy = int(np.median(xs)), int(np.median(ys))
            with page.expect_response(lambda r: r.url.endswith("/segment"), timeout=60_000) as answer:
                page.mouse.click(rect["x"] + (cx + 0.5) * zoom, rect["y"] + (cy + 0.5) * zoom)
            assert answer.value.status == 200
        finally:
            browser.close()
    assert len(bodies) == 2, bodies
    first, second = bodies
    assert first["candidates"] is True and "previous" not in first
    assert second["points"] == [{"x": cx, "y": cy, "positive": True}] and second["box"] == first["box"]
    assert "previous" not in second
