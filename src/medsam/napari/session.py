"""``SegmentationSession``: one model on one image, as the napari widget uses it (no Qt, no
napari: plain arrays in and out, so it is tested and reused without a display).

The image is normalised once the way ``medsam segment`` does it
(:func:`medsam.segment_io.to_model_input`; with no modality known: uint8 kept, anything else
min-max scaled over the whole volume). Each slice's embedding is computed once and kept in a
small LRU, so a second prompt on a slice runs only the decoder.

Coordinates: an image is ``(H, W)``, ``(H, W, 3|4)`` colour, or a ``(Z, Y, X)`` volume; boxes are
``(x0, y0, x1, y1)`` inclusive pixels (x = column), points ``(x, y)``; a slice index is along
axis 0 of a volume (0 for a 2D image).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Native3DSession", "SegmentationSession"]


class SegmentationSession:
    """Prompts on one image with one model.

    Args:
        model: a loaded model (:func:`medsam.load_model`).
        image: the image array (see the module for the layouts).
        rgb: whether a 3-axis array is a colour picture rather than a volume.
        modality: model-input normalisation (``"CT"``, ``"MR"`` ...; None: see the module).
        embeddings_in_memory: slice embeddings kept.
    """

    def __init__(
        self,
        model: Any,
        image: np.ndarray,
        *,
        rgb: bool = False,
        modality: str | None = None,
        embeddings_in_memory: int = 32,
    ) -> None:
        from ..io import MedicalImage
        from ..predictor import Predictor
        from ..segment_io import to_model_input

        array = np.asarray(image)
        nd = array.ndim - (1 if rgb else 0)
        picture = MedicalImage(array, spacing=(1.0,) * nd, origin=(0.0,) * nd, direction=np.eye(nd), is_color=rgb)
        self.is_volume = picture.is_volume
        self.spatial_shape: tuple[int, ...] = tuple(int(n) for n in picture.spatial_shape)
        self.model_input = to_model_input(picture, modality)
        self.predictor = Predictor(model)
        self._embeddings: OrderedDict[int, Any] = OrderedDict()
        self._capacity = max(1, int(embeddings_in_memory))
        self._active: int | None = None
        self.encoder_calls = 0

    @property
    def n_slices(self) -> int:
        return self.spatial_shape[0] if self.is_volume else 1

    def _slice(self, index: int) -> np.ndarray:
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} is outside 0..{self.n_slices - 1}")
        return self.model_input[index] if self.is_volume else self.model_input

    def activate(self, index: int) -> None:
        """Make slice ``index`` the predictor's image (its embedding from the LRU when kept)."""
        if self._active == index:
            return
        picture = self._slice(index)
        kept = self._embeddings.get(index)
        if kept is not None:
            self._embeddings.move_to_end(index)
            self.predictor.set_embedding(kept, picture.shape[:2], image=picture)
        else:
            self.predictor.set_image(picture)
            self.encoder_calls += 1
            self._embeddings[index] = self.predictor.embedding
            while len(self._embeddings) > self._capacity:
                self._embeddings.popitem(last=False)
        self._active = index

    def segment(
        self,
        index: int,
        box: tuple[float, float, float, float] | None = None,
        points: Sequence[tuple[float, float, bool]] = (),
    ) -> tuple[np.ndarray, float]:
        """``(mask (H, W) bool, predicted IoU)`` of one object on slice ``index`` from a box and/or
        points ``(x, y, positive)``; raises :class:`medsam.errors.PromptError` for bad prompts."""
        from ..predictor import PromptError

        if box is None and not points:
            raise PromptError("give a box or points")
        self.activate(index)
        kwargs: dict[str, Any] = {}
        if box is not None:
            kwargs["boxes"] = np.asarray([box], dtype=np.float64)
        if points:
            kwargs["points"] = np.asarray([[(x, y) for x, y, _ in points]], dtype=np.float64)
            kwargs["point_labels"] = np.asarray([[1 if positive else 0 for _, _, positive in points]])
        pred = self.predictor.predict(**kwargs)
        return np.asarray(pred.masks[0], dtype=bool), float(pred.scores[0])

    def propagate(
        self,
        labels: np.ndarray,
        label: int,
        index: int,
        *,
        iou_threshold: float = 0.5,
        box_margin: int = 3,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Spread ``label`` from its mask on slice ``index`` through the volume from the mask's box
        (:func:`medsam.volume.segment_volume`; a SAM2-family model tracks it with memory,
        :func:`medsam.tracking.track_volume`); returns the new label map (the given one is not
        changed; slices where ``label`` already is are kept) and a summary."""
        from ..model.sam2 import SAM2Model
        from ..predictor import Predictor, PromptError
        from ..volume import Box2D, merge_propagated, segment_volume

        if not self.is_volume:
            raise PromptError("propagation needs a volume")
        key = np.asarray(labels[index]) == label
        if not key.any():
            raise PromptError(f"label {label} is empty on slice {index}: segment it there first")
        rows, cols = np.flatnonzero(key.any(axis=1)), np.flatnonzero(key.any(axis=0))
        prompt = Box2D(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]), slice=index)
        model = self.predictor.model
        if isinstance(model, SAM2Model):  # memory tracking, as MedSAM2's 3D inference
            from ..tracking import track_volume

            result = track_volume(model, self.model_input, [prompt], progress=progress)
        else:
            result = segment_volume(
                Predictor(model),
                self.model_input,
                [prompt],
                iou_threshold=iou_threshold,
                box_margin=box_margin,
                progress=progress,
            )
        merged = merge_propagated(np.array(labels, copy=True), result.labels, label, index, replace=False)
        self.encoder_calls += result.embeddings_computed
        return merged, {"slices": result.slices[0], "stop_reasons": list(result.stop_reasons[0])}


class Native3DSession:
    """SAM-Med3D on one volume layer: voxel clicks -> the object's mask
    (:class:`medsam.native3d.Native3DPredictor`: the volume resampled once, each crop embedded once).

    Args:
        model: a loaded SAM-Med3D model.
        volume: the ``(Z, Y, X)`` layer data, in its stored intensities (SAM-Med3D z-scores them).
        spacing_zyx: the layer's scale, taken as millimetres per voxel along (z, y, x).
    """

    is_volume = True

    def __init__(self, model: Any, volume: np.ndarray, spacing_zyx: Sequence[float]) -> None:
        from ..io import MedicalImage
        from ..native3d import Native3DPredictor

        array = np.asarray(volume)
        if array.ndim != 3:
            raise ValueError("SAM-Med3D segments volumes: choose a 3D image layer")
        spacing = tuple(float(v) for v in reversed(tuple(spacing_zyx)[-3:]))
        image = MedicalImage(array, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3))
        self.spatial_shape: tuple[int, ...] = tuple(int(n) for n in array.shape)
        self.predictor = Native3DPredictor(model)
        self.predictor.set_volume(image)

    @property
    def encoder_calls(self) -> int:
        return self.predictor.encoder_calls

    def segment_clicks(self, clicks: Sequence[tuple[tuple[int, int, int], bool]]) -> np.ndarray:
        """The ``(Z, Y, X)`` bool mask of one object from its voxel clicks, decoded in order."""
        from ..native3d import VoxelClick

        if not any(positive for _, positive in clicks):
            raise ValueError("give at least one foreground point")
        result = self.predictor.predict([VoxelClick(ijk, positive) for ijk, positive in clicks])
        return np.asarray(result.mask, dtype=bool)
