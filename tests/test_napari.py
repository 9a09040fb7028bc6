"""The napari plugin: prompts from real napari layers, the session against the predictor and the
phantom organ, the dock widget driven by clicks (Qt; a ViewerModel, so no OpenGL is needed), the
widget docked in a real viewer through the npe2 manifest (needs a display: pytest-xvfb starts Xvfb
where it is installed), and ``npe2 validate``.

Set ``MEDSAM_SCREENSHOT_NAPARI=path.png`` to keep a screenshot of the viewer test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench_fixtures import synthetic_ct

if not os.environ.get("DISPLAY"):  # no X server (nor pytest-xvfb's): Qt widgets draw offscreen
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

napari = pytest.importorskip("napari", reason="the napari extra is not installed")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")


@pytest.fixture(scope="module")
def default_model():
    import medsam

    return medsam.load_model(device="cpu")


@pytest.fixture(scope="module")
def ct():
    vol, organ = synthetic_ct()
    return vol, organ, organ.shape[0] // 2


def organ_box(organ: np.ndarray, k: int, margin: int = 3) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(organ[k])
    return int(xs.min()) - margin, int(ys.min()) - margin, int(xs.max()) + margin, int(ys.max()) + margin


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def rectangle(k: int, box: tuple[int, int, int, int], scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A napari rectangle on slice ``k`` in world units of ``scale`` ((z, y, x) vertices)."""
    x0, y0, x1, y1 = box
    corners = [(k, y0, x0), (k, y0, x1), (k, y1, x1), (k, y1, x0)]
    return np.asarray(corners, dtype=float) * np.asarray(scale)


def test_prompts_map_through_world_coordinates(ct):
    """A Shapes / Points layer drawn in world units maps to the image's pixels (the image has a
    spacing and offset; the shapes layer none)."""
    from napari.layers import Image, Points, Shapes

    from medsam.napari.prompts import boxes_from_shapes, points_by_slice

    vol, _, k = ct
    scale, translate = (3.0, 0.8, 0.7), (100.0, 25.0, -40.0)
    image = Image(vol, scale=scale, translate=translate)
    box = (10, 20, 60, 70)
    world = rectangle(k, box, scale) + np.asarray(translate)
    shapes = Shapes([world, world[:2]], shape_type=["rectangle", "line"])
    assert boxes_from_shapes(shapes, image) == [(k, box)]
    fg = Points(np.asarray([[k, 30, 40]], float) * scale + translate)
    bg = Points(np.asarray([[k, 31, 50], [k + 1, 5, 5]], float) * scale + translate)
    grouped = points_by_slice(image, fg, bg)
    assert grouped == {k: [(40.0, 30.0, True), (50.0, 31.0, False)], k + 1: [(5.0, 5.0, False)]}
    with pytest.raises(ValueError, match="outside"):
        points_by_slice(image, Points(np.asarray([[k, 30, 500]], float) * scale + translate))
    slanted = rectangle(k, box, scale) + np.asarray(translate)
    slanted[2, 0] += 2 * scale[0]
    with pytest.raises(ValueError, match="one slice"):
        boxes_from_shapes(Shapes([slanted], shape_type="rectangle"), image)


def test_session_matches_the_predictor_and_keeps_embeddings(default_model, ct):
    from medsam.napari.session import SegmentationSession
    from medsam.predictor import Predictor

    vol, organ, k = ct
    session = SegmentationSession(default_model, vol)
    box = organ_box(organ, k)
    mask, _ = session.segment(k, box=box)
    assert dice(mask, organ[k]) > 0.8
    reference = Predictor(default_model)
    reference.set_image(session.model_input[k])
    assert np.array_equal(mask, reference.predict(boxes=np.asarray([box], float)).masks[0])
    session.segment(k, points=[(box[0] + 20.0, box[1] + 15.0, True)])
    session.segment(k + 1, box=box)
    session.segment(k, box=box)
    assert session.encoder_calls == 2  # slice k embedded once, then reused
    labels = np.zeros(vol.shape, np.uint8)
    labels[k][mask] = 4
    merged, summary = session.propagate(labels, 4, k)
    assert labels.max() == 4 and (labels > 0).sum() == mask.sum()  # the input is not changed
    assert np.array_equal(merged[k] == 4, mask) and dice(merged == 4, organ) > 0.7
    assert summary["slices"][0] < k < summary["slices"][1]


def test_widget_segments_rectangles_points_and_propagates(default_model, ct, qtbot):
    from napari.components import ViewerModel

    from medsam.napari.widget import LABELS_LAYER, MedSAMWidget

    vol, organ, k = ct
    viewer = ViewerModel()
    viewer.add_image(vol, name="ct", scale=(3.0, 0.8, 0.7))
    widget = MedSAMWidget(viewer, model=default_model)
    qtbot.addWidget(widget)
    assert widget.image_box.currentText() == "ct"
    viewer.add_shapes([rectangle(k, organ_box(organ, k), (3.0, 0.8, 0.7))], shape_type="rectangle", name="boxes")
    assert widget.shapes_box.currentText() == "boxes"  # the choosers follow the layer list
    widget.label_spin.setValue(2)
    widget.boxes_button.click()
    labels = np.asarray(viewer.layers[LABELS_LAYER].data)
    assert tuple(viewer.layers[LABELS_LAYER].scale) == (3.0, 0.8, 0.7)
    assert set(np.unique(labels)) == {0, 2} and dice(labels[k] == 2, organ[k]) > 0.8
    assert labels[np.arange(labels.shape[0]) != k].sum() == 0

    viewer.dims.set_current_step(0, k)
    with qtbot.waitSignal(widget.propagate_button.clicked, timeout=1000):
        widget.propagate_button.click()
    qtbot.waitUntil(lambda: widget.propagate_button.isEnabled(), timeout=120_000)
    labels = np.asarray(viewer.layers[LABELS_LAYER].data)
    assert dice(labels == 2, organ) > 0.7 and "slices" in widget.status.text()

    ys, xs = np.nonzero(organ[k + 1])
    viewer.add_points(np.asarray([[k + 1, ys.mean(), xs.mean()]]) * (3.0, 0.8, 0.7), name="clicks")
    widget.foreground_box.setCurrentText("clicks")
    widget.label_spin.setValue(5)
    widget.points_button.click()
    assert (np.asarray(viewer.layers[LABELS_LAYER].data)[k + 1] == 5).any()
    assert "1 slice(s)" in widget.status.text()

    viewer.layers.remove("boxes")  # a bad state is reported in the widget, nothing raised
    widget.boxes_button.click()
    assert "Shapes" in widget.status.text()

    widget.checkpoint.setText(str(Path("/nonexistent/model.pth")))
    widget.load_button.click()
    assert widget.status.text().startswith("cannot load the model") and widget.model is default_model
    widget.checkpoint.setText("")  # the embedded default
    widget.load_button.click()
    assert widget.status.text().startswith("model:") and widget.model is not default_model


def test_widget_docks_in_a_real_viewer_through_the_manifest(make_napari_viewer, default_model, ct, qtbot):
    if not os.environ.get("DISPLAY"):
        pytest.skip("no X display for napari's OpenGL canvas: install Xvfb (pytest-xvfb starts it)")
    vol, organ, k = ct
    viewer = make_napari_viewer()
    viewer.add_image(vol, name="ct")
    _, widget = viewer.window.add_plugin_dock_widget("medsam", "MedSAM")
    widget.model = default_model
    viewer.add_shapes([rectangle(k, organ_box(organ, k))], shape_type="rectangle", name="boxes")
    viewer.dims.set_current_step(0, k)
    widget.boxes_button.click()
    assert dice(np.asarray(viewer.layers["MedSAM labels"].data)[k] == 1, organ[k]) > 0.8
    shot = os.environ.get("MEDSAM_SCREENSHOT_NAPARI")
    if shot:
        viewer.window.resize(1200, 760)
        viewer.screenshot(shot, canvas_only=False)


def test_npe2_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", "medsam"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr


def test_session_tracks_with_memory_for_a_sam2_model(ct):
    import dataclasses

    import torch

    from medsam.model.sam2 import SAM2_CONFIGS, SAM2Model
    from medsam.napari.session import SegmentationSession
    from medsam.tracking import track_volume
    from medsam.volume import Box2D

    torch.manual_seed(0)
    model = SAM2Model(dataclasses.replace(SAM2_CONFIGS["sam2.1_hiera_tiny"], img_size=128)).eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.fill_(8.0)
    vol, organ, k = ct
    session = SegmentationSession(model, vol)
    labels = np.zeros(vol.shape, np.uint8)
    labels[k][organ[k]] = 1
    merged, _ = session.propagate(labels, 1, k)
    rows, cols = np.flatnonzero(organ[k].any(axis=1)), np.flatnonzero(organ[k].any(axis=0))
    tracked = track_volume(model, session.model_input, [Box2D(cols[0], rows[0], cols[-1], rows[-1], slice=k)])
    others = np.arange(vol.shape[0]) != k
    assert np.array_equal(merged[others] == 1, tracked.labels[others] > 0) and (merged[others] == 1).any()
    assert np.array_equal(merged[k] == 1, organ[k])


def test_widget_segments_a_volume_from_clicks_with_sam_med3d(ct, qtbot, tmp_path):
    """A SAM-Med3D model (tiny, seeded) in the widget: every foreground and background point is one
    voxel click, the layer's scale is the spacing, the mask is SAM-Med3D's own for those clicks."""
    import torch
    from napari.components import ViewerModel

    from medsam.io import MedicalImage
    from medsam.model.sam_med3d import SamMed3DConfig, SamMed3DModel
    from medsam.napari.widget import LABELS_LAYER, MedSAMWidget
    from medsam.native3d import VoxelClick, segment_clicks_3d

    torch.manual_seed(0)
    model = SamMed3DModel(
        SamMed3DConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, prompt_embed_dim=48)
    ).eval()
    vol, organ, k = ct
    scale = (3.0, 0.8, 0.7)
    viewer = ViewerModel()
    viewer.add_image(vol, name="ct", scale=scale)
    widget = MedSAMWidget(viewer, model=model)
    qtbot.addWidget(widget)
    zs, ys, xs = np.nonzero(organ)
    inside = (k, int(ys[zs == k].mean()), int(xs[zs == k].mean()))
    viewer.add_points(np.asarray([inside]) * scale, name="fg")
    viewer.add_points(np.asarray([(k, 2, 2)]) * scale, name="bg")
    widget.foreground_box.setCurrentText("fg")
    widget.background_box.setCurrentText("bg")
    widget.label_spin.setValue(7)
    widget.points_button.click()
    assert "SAM-Med3D" in widget.status.text(), widget.status.text()
    image = MedicalImage(vol, spacing=scale[::-1], origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    clicks = [VoxelClick(inside[::-1]), VoxelClick((2, 2, k), False)]
    want = segment_clicks_3d(model, image, clicks).mask.astype(bool)
    labels = np.asarray(viewer.layers[LABELS_LAYER].data)
    assert np.array_equal(labels == 7, want) and 0 < want.sum() < want.size  # not a trivial mask
    assert widget.session.encoder_calls == 1
    widget.points_button.click()  # the same clicks again: the crop's embedding is kept
    assert widget.session.encoder_calls == 1

    viewer.add_shapes([rectangle(k, organ_box(organ, k), scale)], shape_type="rectangle", name="boxes")
    widget.boxes_button.click()  # rectangles and propagation need a slice-by-slice model
    assert "use Segment points" in widget.status.text()
    widget.propagate_button.click()
    assert "use Segment points" in widget.status.text()
    viewer.layers["fg"].data = np.asarray([(k, 2, 400)]) * scale  # outside the volume
    widget.points_button.click()
    assert "outside the volume" in widget.status.text()
