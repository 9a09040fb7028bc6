"""Active learning: which unlabelled image should be annotated next.

Score: **box-jitter disagreement** on the central slice (:meth:`SegmentationEngine.uncertainty`),
with the model's predicted IoU only as a tie-breaker. Scores are stored per model fingerprint in
``DATA/.medsam/uncertainty.json`` (written atomically), so they survive a restart and are never
mixed between models. Ranking: unlabelled images by uncertainty, highest first (ties: lower
predicted IoU first); images not scored yet follow in name order, then labelled images.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..io.atomic import atomic_output

__all__ = ["METHOD", "UncertaintyStore", "rank_images"]

METHOD = (
    "box-jitter disagreement: 1 - mean IoU between the masks of a central box (middle half of the "
    "central slice) and jittered copies (corners moved by up to 10% of the box size) and their "
    "majority mask; predicted IoU breaks ties"
)


class UncertaintyStore:
    """``{fingerprint: {image_id: score dict}}`` in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def scores(self, fingerprint: str) -> dict[str, dict]:
        return dict(self._read().get(fingerprint, {}))

    def put(self, fingerprint: str, image_id: str, score: dict) -> None:
        with self._lock:
            data = self._read()
            data = {fingerprint: data.get(fingerprint, {})}  # scores of older models are dropped
            data[fingerprint][image_id] = score
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1))


def rank_images(ids: list[str], status: dict[str, str], scores: dict[str, dict]) -> list[dict]:
    """Order ``ids`` for annotation (see the module docstring); returns one dict per image."""

    def row(i: str) -> dict:
        s = scores.get(i, {})
        return {
            "image_id": i,
            "status": status[i],
            "uncertainty": s.get("uncertainty"),
            "agreement": s.get("agreement"),
            "predicted_iou": s.get("predicted_iou"),
            "slice_index": s.get("slice_index"),
        }

    rows = [row(i) for i in ids]

    def key(r: dict):
        labelled = r["status"] != "unlabelled"
        scored = r["uncertainty"] is not None
        return (labelled, not scored, -(r["uncertainty"] or 0.0), r["predicted_iou"] or 0.0, r["image_id"])

    return sorted(rows, key=key)
