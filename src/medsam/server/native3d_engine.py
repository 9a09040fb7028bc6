"""SAM-Med3D in the workbench: voxel clicks on a volume -> a 3D mask (``POST /segment3d``).

Served beside the 2D model when ``medsam serve --model3d CKPT`` (or ``create_app(model3d=...)``)
names a SAM-Med3D checkpoint. One :class:`medsam.native3d.Native3DPredictor` per volume is kept
(the last ``volumes_in_memory``), so the volume is resampled once and each crop embedded once
while an annotator clicks; requests run one at a time on the model.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from .datastore import LoadedImage

__all__ = ["Native3DEngine"]


class Native3DEngine:
    """A SAM-Med3D model and the predictors of the volumes it was last asked about.

    Args:
        model: a loaded :class:`medsam.model.sam_med3d.SamMed3DModel`.
        volumes_in_memory: volumes whose resampled array and crop embeddings are kept.
    """

    def __init__(self, model: Any, volumes_in_memory: int = 2) -> None:
        from ..model.sam_med3d import SamMed3DModel

        if not isinstance(model, SamMed3DModel):
            raise ValueError(f"--model3d takes a SAM-Med3D checkpoint, not a {type(model).__name__}")
        self.model = model
        self.capacity = max(1, int(volumes_in_memory))
        self.lock = threading.Lock()
        self._predictors: OrderedDict[str, Any] = OrderedDict()

    def info(self) -> dict:
        """Name, crop size and spacing of the model (``GET /info``)."""
        from ..embedding_cache import model_fingerprint

        config = self.model.config
        return {
            "name": getattr(config, "name", "sam_med3d"),
            "img_size": int(config.img_size),
            "spacing_mm": float(config.spacing_mm),
            "fingerprint": model_fingerprint(self.model),
        }

    def segment(self, loaded: LoadedImage, clicks: Sequence[tuple[tuple[int, int, int], bool]], sliding_window: bool):
        """``(result, encoder calls for this volume, milliseconds)``; ValueError for clicks or an
        image SAM-Med3D cannot take (a 2D or colour image, a click outside the volume, positive
        clicks further apart than one crop)."""
        from ..native3d import Native3DPredictor, VoxelClick

        if not loaded.image.is_volume or loaded.image.is_color:
            raise ValueError("SAM-Med3D segments grey volumes; this image is not one")
        t0 = time.perf_counter()
        with self.lock:
            predictor = self._predictors.pop(loaded.image_id, None)
            if predictor is None:
                predictor = Native3DPredictor(self.model)
                predictor.set_volume(loaded.image)
            self._predictors[loaded.image_id] = predictor
            while len(self._predictors) > self.capacity:
                self._predictors.popitem(last=False)
            result = predictor.predict([VoxelClick(ijk, pos) for ijk, pos in clicks], sliding_window=sliding_window)
            calls = predictor.encoder_calls
        return result, calls, (time.perf_counter() - t0) * 1000.0
