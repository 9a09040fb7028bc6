"""Active learning: which unlabelled image should be annotated next.

Score: **box-jitter disagreement** on the central slice (:meth:`SegmentationEngine.uncertainty`),
with the model's predicted IoU only as a tie-breaker. Scores are stored per model fingerprint in
the state database's ``uncertainty`` table (:mod:`medsam.server.state_db`), so they survive a
restart, are shared by every server process, and are never mixed between models.
Ranking: unlabelled images by uncertainty, highest first (ties: lower predicted IoU first);
images not scored yet follow in name order, then labelled images.
"""

from __future__ import annotations

from .state_db import StateDatabase

__all__ = ["METHOD", "UncertaintyStore", "rank_images"]

METHOD = (
    "box-jitter disagreement: 1 - mean IoU between the masks of a central box (middle half of the "
    "central slice) and jittered copies (corners moved by up to 10% of the box size) and their "
    "majority mask; predicted IoU breaks ties"
)


class UncertaintyStore:
    """Scores per ``(model fingerprint, image id)`` in the state database."""

    def __init__(self, db: StateDatabase) -> None:
        self.db = db

    def scores(self, fingerprint: str) -> dict[str, dict]:
        from sqlalchemy import select

        t = self.db.uncertainty
        with self.db.read() as conn:
            rows = conn.execute(select(t.c.image_id, t.c.score).where(t.c.fingerprint == fingerprint)).all()
        return {str(i): dict(score) for i, score in rows}

    def put(self, fingerprint: str, image_id: str, score: dict) -> None:
        """Store one score; the scores of every other model are dropped."""
        from sqlalchemy import delete, insert

        t = self.db.uncertainty
        with self.db.write() as conn:
            conn.execute(delete(t).where((t.c.fingerprint != fingerprint) | (t.c.image_id == image_id)))
            conn.execute(insert(t).values(fingerprint=fingerprint, image_id=image_id, score=score))


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
