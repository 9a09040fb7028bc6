"""MONAI Label sessions: an image a client sends for inference without adding it to the datastore.

3D Slicer's MONAILabel module opens a session when the volume on screen came from the user's
disk rather than from the server: ``PUT /session/`` with the file, then ``/infer/{model}`` with
``session_id`` instead of ``image``. Here a session is a folder ``.medsam/sessions/<id>/`` with the
uploaded file (checked as any upload: suffix, declared size, readable) and ``session.json``
(name, created, expiry: one hour unless the client asks otherwise, at most a week); an expired
session is removed when next looked at, and all expired ones when a session is created. Session
ids are random (128 bits).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ..io.atomic import write_json
from .datastore import Datastore

__all__ = ["DEFAULT_EXPIRY_S", "SessionStore"]

DEFAULT_EXPIRY_S = 3600
MAX_EXPIRY_S = 7 * 24 * 3600


class SessionStore:
    """Sessions under ``state_dir/sessions`` of one server."""

    def __init__(self, state_dir: Path, datastore: Datastore) -> None:
        self.dir = Path(state_dir) / "sessions"
        self.datastore = datastore

    def _folder(self, session_id: str) -> Path | None:
        if not (16 <= len(session_id) <= 64) or not session_id.replace("-", "").replace("_", "").isalnum():
            return None
        return self.dir / session_id

    async def create(self, name: str, chunks: AsyncIterator[bytes], size: int | None, expiry_s: int) -> dict:
        """Store one uploaded image; returns the session's info (raises as
        :meth:`Datastore.add_upload` does)."""
        self.purge()
        session_id = secrets.token_urlsafe(16)
        folder = self.dir / session_id
        folder.mkdir(parents=True)
        try:
            stored = await self.datastore.add_upload(name, chunks, size, folder=folder)
            now = time.time()
            expiry = DEFAULT_EXPIRY_S if expiry_s <= 0 else min(int(expiry_s), MAX_EXPIRY_S)
            info = {"session_id": session_id, "name": stored, "created": now, "expiry": expiry}
            write_json(folder / "session.json", info)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return info

    def get(self, session_id: str) -> tuple[dict, Path] | None:
        """``(info, image path)`` of a live session, or None (unknown, malformed or expired)."""
        folder = self._folder(session_id)
        if folder is None or not folder.is_dir():
            return None
        try:
            info = json.loads((folder / "session.json").read_text())
            image = folder / str(info["name"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if time.time() > float(info.get("created", 0)) + float(info.get("expiry", 0)) or not image.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return info, image

    def remove(self, session_id: str) -> dict | None:
        found = self.get(session_id)
        if found is None:
            return None
        shutil.rmtree(found[1].parent, ignore_errors=True)
        return found[0]

    def purge(self) -> int:
        """Remove the expired sessions; returns how many."""
        if not self.dir.is_dir():
            return 0
        removed = 0
        for folder in self.dir.iterdir():
            if folder.is_dir() and self.get(folder.name) is None and not folder.exists():
                removed += 1
        return removed
