"""``ServerSettings``: everything the workbench server is configured with, in one typed object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_VOXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "STATE_DIR",
    "ServerSettings",
]

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_IMAGE_VOXELS = 256 * 1024 * 1024  # e.g. 1024 x 1024 x 256, or 512 x 512 x 1024
DEFAULT_MAX_IMAGE_BYTES = 2 * 1024 * 1024 * 1024
STATE_DIR = ".medsam"  # inside the data folder: labels/, cache/, state.sqlite3


@dataclass(frozen=True)
class ServerSettings:
    """Configuration of one workbench server.

    Attributes:
        data_dir: the datastore folder (resolved, absolute). Nothing outside it is read or written.
        token: when set, every API request needs ``Authorization: Bearer <token>``.
        max_upload_bytes: largest accepted upload (default 512 MiB), as sent (compressed).
        max_image_voxels, max_image_bytes: largest pixel data an image file may declare in its
            header (default 256 Mi voxels, 2 GiB), checked before anything is decompressed, for
            uploads and for every image file the server reads (:func:`medsam.io.header.check_declared_size`;
            a DICOM series folder is read without this check).
        allowed_hosts: accepted ``Host`` header names (DNS-rebinding protection); ``("*",)``
            accepts any. Default: the loopback names.
        modality: model-input normalisation for images without a DICOM modality
            (``"CT"``, ``"MR"`` ...; see :func:`medsam.segment.to_model_input`); ``None`` keeps
            uint8 data and min-max scales the rest.
        model_window: CT window for the model input (name or ``(level, width)``).
        checkpoint: path of the checkpoint the model came from (recorded in provenance).
        images_in_memory: images (arrays + model input) kept in the reading LRU.
        embeddings_in_memory: slice embeddings kept in the in-memory LRU (before the disk cache).
        database_url: SQLAlchemy URL of the state database (:mod:`medsam.server.state_db`);
            empty: SQLite in ``state_dir``.
    """

    data_dir: Path
    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_voxels: int = DEFAULT_MAX_IMAGE_VOXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    modality: str | None = None
    model_window: str | tuple[float, float] | None = None
    checkpoint: Path | None = None
    images_in_memory: int = 4
    embeddings_in_memory: int = 64
    database_url: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def state_dir(self) -> Path:
        return self.data_dir / STATE_DIR

    @property
    def labels_dir(self) -> Path:
        return self.state_dir / "labels"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"
