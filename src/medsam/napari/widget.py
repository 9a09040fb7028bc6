"""``MedSAMWidget``: the napari dock widget (contributed by ``napari.yaml``).

What it does, top to bottom: *Model* loads the embedded default (empty path) or a checkpoint
(:func:`medsam.load_model`); the layer choosers pick the image, the Shapes layer whose rectangles
are boxes, and the Points layers of foreground / background clicks; *Segment rectangles* writes one
object per rectangle (labels ``label``, ``label + 1`` ...), *Segment points* one object per slice
that has foreground points (with a SAM-Med3D model: one object in 3D from every foreground and
background point, :class:`medsam.napari.session.Native3DSession`, the layer's scale taken as its
spacing in mm); *Propagate* spreads ``label`` from the current slice through the
volume in a worker thread (slices that already hold the label are kept). Results go to the Labels
layer ``MedSAM labels`` (created with the image's scale and translation). Slice embeddings are
kept per image (:class:`medsam.napari.session.SegmentationSession`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .prompts import boxes_from_shapes, points_by_slice, voxel_clicks
from .session import Native3DSession, SegmentationSession

__all__ = ["LABELS_LAYER", "MedSAMWidget"]

LABELS_LAYER = "MedSAM labels"
_NONE = "(none)"
MODALITIES = ("auto", "CT", "MR", "PET", "US", "XR")


class MedSAMWidget(QWidget):
    """The dock widget; ``napari_viewer`` is injected by napari (any ``ViewerModel`` works)."""

    def __init__(self, napari_viewer: Any, model: Any = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model = model
        self.session: SegmentationSession | None = None
        self._session_key: tuple | None = None
        self.worker: Any = None

        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("embedded default (or a checkpoint path)")
        self.load_button = QPushButton("Load model")
        self.image_box, self.shapes_box = QComboBox(), QComboBox()
        self.foreground_box, self.background_box = QComboBox(), QComboBox()
        self.modality_box = QComboBox()
        self.modality_box.addItems(MODALITIES)
        self.label_spin = QSpinBox()
        self.label_spin.setRange(1, 255)
        self.boxes_button = QPushButton("Segment rectangles")
        self.points_button = QPushButton("Segment points")
        self.propagate_button = QPushButton("Propagate")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        model_row = QHBoxLayout()
        model_row.addWidget(self.checkpoint)
        model_row.addWidget(self.load_button)
        form = QFormLayout()
        form.addRow("Model", model_row)
        form.addRow("Image", self.image_box)
        form.addRow("Intensities", self.modality_box)
        form.addRow("Rectangles", self.shapes_box)
        form.addRow("Foreground points", self.foreground_box)
        form.addRow("Background points", self.background_box)
        form.addRow("Label", self.label_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for button in (self.boxes_button, self.points_button, self.propagate_button):
            layout.addWidget(button)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.load_button.clicked.connect(self.load_model)
        self.boxes_button.clicked.connect(self.segment_rectangles)
        self.points_button.clicked.connect(self.segment_points)
        self.propagate_button.clicked.connect(self.propagate)
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self.refresh_layers)
        self.refresh_layers()

    # ------------------------------------------------------------------ layers
    def refresh_layers(self, *_: Any) -> None:
        """Refill the layer choosers, keeping the current choices where they still exist."""
        from napari.layers import Image, Points, Shapes

        def fill(box: QComboBox, kind: type, optional: bool) -> None:
            current = box.currentText()
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]
            box.blockSignals(True)
            box.clear()
            box.addItems(([_NONE] if optional else []) + names)
            if current in names:
                box.setCurrentText(current)
            box.blockSignals(False)

        fill(self.image_box, Image, False)
        fill(self.shapes_box, Shapes, False)
        fill(self.foreground_box, Points, False)
        fill(self.background_box, Points, True)

    def _layer(self, box: QComboBox) -> Any:
        name = box.currentText()
        return self.viewer.layers[name] if name and name != _NONE and name in self.viewer.layers else None

    # ------------------------------------------------------------------ model and session
    def load_model(self) -> None:
        """Load the embedded default or the checkpoint named in the path field."""
        from .. import load_model

        path = self.checkpoint.text().strip() or None
        try:
            model = load_model(path, device="cpu")
        except Exception as exc:  # shown to the user, who may fix the path
            self.say(f"cannot load the model: {str(exc).splitlines()[0]}")
            return
        self.model = model
        self.session, self._session_key = None, None
        self.say(f"model: {getattr(getattr(self.model, 'config', None), 'name', type(self.model).__name__)}")

    def _is_3d_model(self) -> bool:
        return getattr(getattr(self.model, "config", None), "family", "") == "sam_med3d"

    def _session(self) -> SegmentationSession | Native3DSession:
        image = self._layer(self.image_box)
        if image is None:
            raise ValueError("add an image layer first")
        if self.model is None:
            self.load_model()
            if self.model is None:
                raise ValueError("no model loaded")
        modality = self.modality_box.currentText()
        key = (id(image.data), bool(image.rgb), modality, id(self.model), tuple(image.scale))
        if self.session is None or self._session_key != key:
            if self._is_3d_model():
                if image.rgb:
                    raise ValueError("SAM-Med3D segments grey volumes: choose a 3D image layer")
                self.session = Native3DSession(self.model, np.asarray(image.data), tuple(image.scale))
            else:
                self.session = SegmentationSession(
                    self.model,
                    np.asarray(image.data),
                    rgb=bool(image.rgb),
                    modality=None if modality == "auto" else modality,
                )
            self._session_key = key
        return self.session

    def _slice_session(self) -> SegmentationSession:
        """The session of a slice-by-slice model (SAM-Med3D takes clicks only)."""
        session = self._session()
        if isinstance(session, Native3DSession):
            raise ValueError("SAM-Med3D segments from clicks: use Segment points (foreground and background)")
        return session

    def labels_layer(self) -> Any:
        """The ``MedSAM labels`` layer, created (zeros, the image's grid) when missing."""
        image = self._layer(self.image_box)
        session = self._session()
        if LABELS_LAYER in self.viewer.layers:
            layer = self.viewer.layers[LABELS_LAYER]
            if tuple(layer.data.shape) == session.spatial_shape:
                return layer
            self.viewer.layers.remove(layer)
        data = np.zeros(session.spatial_shape, dtype=np.uint8)
        scale = tuple(image.scale)[-len(session.spatial_shape) :]
        translate = tuple(image.translate)[-len(session.spatial_shape) :]
        return self.viewer.add_labels(data, name=LABELS_LAYER, scale=scale, translate=translate)

    def _paint(self, index: int, mask: np.ndarray, value: int) -> None:
        layer = self.labels_layer()
        data = np.asarray(layer.data)
        plane = data[index] if self.session is not None and self.session.is_volume else data
        plane[mask] = value
        layer.data = data
        layer.refresh()

    def say(self, text: str) -> None:
        self.status.setText(text)

    # ------------------------------------------------------------------ actions
    def segment_rectangles(self) -> None:
        """One object per rectangle of the chosen Shapes layer."""
        try:
            session = self._slice_session()
            shapes = self._layer(self.shapes_box)
            if shapes is None:
                raise ValueError("add a Shapes layer and draw rectangles")
            boxes = boxes_from_shapes(shapes, self._layer(self.image_box))
            if not boxes:
                raise ValueError("the Shapes layer has no rectangles")
            first = self.label_spin.value()
            for n, (index, box) in enumerate(boxes):
                mask, _ = session.segment(index, box=box)
                self._paint(index, mask, min(255, first + n))
        except (ValueError, IndexError) as exc:
            self.say(str(exc))
            return
        self.say(f"{len(boxes)} object(s); labels {first}..{min(255, first + len(boxes) - 1)}")

    def segment_points(self) -> None:
        """One object (label ``label``) per slice holding foreground points."""
        try:
            session = self._session()
            foreground = self._layer(self.foreground_box)
            if foreground is None:
                raise ValueError("add a Points layer of foreground clicks")
            if isinstance(session, Native3DSession):  # one object in 3D from every click
                clicks = voxel_clicks(self._layer(self.image_box), foreground, self._layer(self.background_box))
                mask = session.segment_clicks(clicks)
                layer = self.labels_layer()
                data = np.asarray(layer.data)
                data[mask] = self.label_spin.value()
                layer.data = data
                layer.refresh()
                self.say(f"{int(mask.sum())} voxels from {len(clicks)} click(s) (SAM-Med3D)")
                return
            grouped = points_by_slice(self._layer(self.image_box), foreground, self._layer(self.background_box))
            done = 0
            for index, points in sorted(grouped.items()):
                if not any(p[2] for p in points):
                    continue
                mask, _ = session.segment(index, points=points)
                self._paint(index, mask, self.label_spin.value())
                done += 1
            if not done:
                raise ValueError("no foreground point")
        except (ValueError, IndexError) as exc:
            self.say(str(exc))
            return
        self.say(f"{done} slice(s) segmented from points")

    def propagate(self) -> None:
        """Spread ``label`` from the current slice through the volume (a worker thread)."""
        from napari.qt.threading import create_worker

        try:
            session = self._slice_session()
            layer = self.labels_layer()
            if not session.is_volume:
                raise ValueError("propagation needs a volume")
            index = int(self.viewer.dims.current_step[-3])
            label = self.label_spin.value()
            labels = np.array(layer.data, copy=True)
        except (ValueError, IndexError) as exc:
            self.say(str(exc))
            return
        self.propagate_button.setEnabled(False)
        self.say(f"propagating label {label} from slice {index} ...")

        def work() -> Any:
            return session.propagate(labels, label, index)

        def done(result: Any) -> None:
            merged, summary = result
            layer.data = merged
            layer.refresh()
            self.say(f"label {label} on slices {summary['slices']}")

        def failed(exc: Exception) -> None:
            self.say(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

        self.worker = create_worker(work)
        self.worker.returned.connect(done)
        self.worker.errored.connect(failed)
        self.worker.finished.connect(lambda: self.propagate_button.setEnabled(True))
        self.worker.start()
