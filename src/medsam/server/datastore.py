"""The datastore: a folder of images and volumes, listed, looked up safely, read and uploaded.

An image **id** is the image's path relative to the data folder, with ``/`` separators:
``case01.nii.gz``, ``ct/patient7.nrrd``, ``mri/series_a`` (a folder holding one DICOM series).
Ids are checked with :func:`medsam.server.security.safe_relative_path` and resolved with
symlinks followed; anything that lands outside the folder, or inside its hidden state folder
``.medsam/``, is refused with :class:`UnsafePathError`. Listing never follows directory symlinks
and skips file symlinks that point outside.

What counts as an image: a file whose suffix :func:`medsam.io.read_image` reads (NIfTI, NRRD,
MetaImage, DICOM, PNG, JPEG, BMP, TIFF; not ``.npz`` challenge cases and not the ``.raw`` data
files of ``.mhd``/``.nhdr`` headers), or a folder holding ``.dcm``/``.dicom``/``.ima`` files (one
DICOM series; its single files are then not listed separately).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..io import MedicalImage, read_image
from ..io.formats import format_of
from ..io.header import ImageTooLarge, check_declared_size
from .security import UnsafePathError, resolve_inside, safe_relative_path
from .settings import STATE_DIR, ServerSettings

__all__ = ["UPLOAD_SUFFIXES", "Datastore", "ImageNotFound", "LoadedImage", "UploadRefused"]

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_IMAGE_FORMATS = {"nifti", "nrrd", "metaimage", "dicom", "png", "jpeg", "bmp", "tiff"}
# Uploads are single files: header/data pairs (.mhd + .raw, .nhdr + .raw.gz) cannot be uploaded.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MAX_LISTED = 100_000


class ImageNotFound(LookupError):
    """No image with this id in the datastore."""


class UploadRefused(ValueError):
    """An upload that is too large, of an unknown type, unreadable, or would overwrite a file.

    Attributes:
        status: the HTTP status the server answers with (409, 413, 415 or 422).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LoadedImage:
    """An image read from the datastore, with the array the model sees.

    Attributes:
        image_id: the id.
        image: the :class:`MedicalImage` (``(Z, Y, X)`` or ``(H, W[, C])``, ITK geometry).
        model_input: uint8 array of the same spatial shape after modality normalisation
            (:func:`medsam.segment.to_model_input`); slices of it are what the encoder embeds.
        value_range: (min, max) of the raw array, for display windows.
    """

    image_id: str
    image: MedicalImage
    model_input: np.ndarray
    value_range: tuple[float, float]

    @property
    def n_slices(self) -> int:
        """Number of slices along axis 0 for a volume, 1 for a 2D image."""
        return int(self.image.spatial_shape[0]) if self.image.is_volume else 1

    def model_slice(self, index: int) -> np.ndarray:
        """The (H, W) or (H, W, 3) uint8 model input of slice ``index`` (0 for 2D), contiguous."""
        self.check_slice(index)
        return np.ascontiguousarray(self.model_input[index] if self.image.is_volume else self.model_input)

    def raw_slice(self, index: int) -> np.ndarray:
        """The raw (H, W) or (H, W, C) slice ``index`` (0 for 2D)."""
        self.check_slice(index)
        return self.image.array[index] if self.image.is_volume else self.image.array

    def check_slice(self, index: int) -> None:
        if not 0 <= int(index) < self.n_slices:
            raise IndexError(f"slice {index} outside 0..{self.n_slices - 1}")


class Datastore:
    """The image folder of one server (see the module docstring).

    Args:
        settings: the server settings (``data_dir`` must exist).
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.root = Path(settings.data_dir).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"data folder is not a folder: {self.root}")
        self._lock = threading.Lock()
        self._loaded: OrderedDict[tuple, LoadedImage] = OrderedDict()

    # ------------------------------------------------------------------ lookup
    def path_of(self, image_id: str) -> Path:
        """The resolved path of ``image_id``; raises UnsafePathError or ImageNotFound."""
        rel = safe_relative_path(image_id)
        try:
            path = resolve_inside(self.root, rel)
            if path == self.root or path.relative_to(self.root).parts[0] == STATE_DIR:
                raise UnsafePathError("not an image id")
            if not self._is_image(path):
                raise ImageNotFound(f"no image {image_id!r}")
        except OSError:  # a name the file system refuses (too long, a link loop): no such image
            raise ImageNotFound(f"no image {image_id!r}") from None
        return path

    def _is_image(self, path: Path) -> bool:
        if path.is_file():
            return format_of(path) in _IMAGE_FORMATS
        if path.is_dir():
            return self._is_dicom_folder(path)
        return False

    @staticmethod
    def _is_dicom_folder(path: Path) -> bool:
        try:
            with os.scandir(path) as it:
                return any(e.is_file(follow_symlinks=False) and e.name.lower().endswith(_DICOM_SUFFIXES) for e in it)
        except OSError:
            return False

    def list_ids(self) -> list[str]:
        """Ids of all images, sorted; hidden entries and ``.medsam`` are skipped."""
        ids: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if here != self.root and self._is_dicom_folder(here):
                ids.append(here.relative_to(self.root).as_posix())
                dirnames[:] = []
                continue
            for name in sorted(filenames):
                if name.startswith(".") or format_of(name) not in _IMAGE_FORMATS:
                    continue
                p = here / name
                if p.is_symlink():
                    try:
                        resolve_inside(self.root, PurePosixPath(p.relative_to(self.root).as_posix()))
                    except UnsafePathError:
                        continue
                    if not p.resolve().is_file():
                        continue
                ids.append(p.relative_to(self.root).as_posix())
                if len(ids) >= _MAX_LISTED:
                    return sorted(ids)
        return sorted(ids)

    # ------------------------------------------------------------------ reading
    def load(self, image_id: str) -> LoadedImage:
        """Read ``image_id`` (through a small LRU keyed by id, size and modification time)."""
        return self.load_file(self.path_of(image_id), image_id)

    def load_file(self, path: Path, image_id: str) -> LoadedImage:
        """Read the image at ``path`` (already checked to be one the server may read) under the
        name ``image_id``, as :meth:`load` does (a MONAI Label session's image, for one)."""
        from ..segment import to_model_input

        stat = path.stat()
        key = (image_id, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
        if path.is_file():
            self.check_size(path)
        image = read_image(path)
        model_input = to_model_input(image, self.settings.modality, self.settings.model_window)
        data = image.array
        loaded = LoadedImage(image_id, image, model_input, (float(np.min(data)), float(np.max(data))))
        with self._lock:
            self._loaded[key] = loaded
            while len(self._loaded) > max(1, self.settings.images_in_memory):
                self._loaded.popitem(last=False)
        return loaded

    def check_size(self, path: Path) -> None:
        """Refuse a file whose header declares more pixel data than the settings allow
        (:class:`medsam.io.header.ImageTooLarge`), before any of it is decompressed."""
        check_declared_size(path, self.settings.max_image_voxels, self.settings.max_image_bytes)

    # ------------------------------------------------------------------ uploads
    async def add_upload(
        self, name: str, chunks: AsyncIterator[bytes], declared_size: int | None, folder: Path | None = None
    ) -> str:
        """Store an uploaded file as ``name`` (a plain file name) in the data folder (or in
        ``folder``, a folder of the server's own state); returns its id (its name in ``folder``).

        The body is streamed into a private temporary folder under ``.medsam/uploads`` and stopped
        as soon as it exceeds ``settings.max_upload_bytes`` (413). The file must have an upload
        suffix (415), declare no more pixel data in its header than the settings allow (413,
        judged before decompressing) and be readable by :func:`medsam.io.read_image` (422). It is then linked into
        place without overwriting an existing file (409), so a reader never sees a partial file.
        """
        rel = safe_relative_path(name)
        if len(rel.parts) != 1:
            raise UploadRefused("upload name must be a plain file name, without folders", 422)
        if not name.lower().endswith(UPLOAD_SUFFIXES):
            raise UploadRefused(f"unsupported file type; accepted: {', '.join(UPLOAD_SUFFIXES)}", 415)
        limit = int(self.settings.max_upload_bytes)
        if declared_size is not None and declared_size > limit:
            raise UploadRefused(f"upload larger than the limit of {limit} bytes", 413)
        target = resolve_inside(self.root, rel) if folder is None else folder / rel.name
        if target.exists() or target.is_symlink():
            raise UploadRefused(f"{name} already exists", 409)
        staging = self.settings.state_dir / "uploads"
        staging.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix="up.", dir=staging))
        try:
            tmp = tmpdir / name
            size = 0
            digest = hashlib.sha256()
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadRefused(f"upload larger than the limit of {limit} bytes", 413)
                    digest.update(chunk)
                    fh.write(chunk)
            if size == 0:
                raise UploadRefused("empty upload", 422)
            try:
                import anyio.to_thread

                await anyio.to_thread.run_sync(self.check_size, tmp)
                await anyio.to_thread.run_sync(read_image, tmp)
            except ImageTooLarge as exc:
                raise UploadRefused(str(exc), 413) from None
            except Exception as exc:  # any reader failure: not an image we can use
                raise UploadRefused(f"not a readable image: {str(exc).splitlines()[0][:200]}", 422) from None
            try:
                os.link(tmp, target)  # atomic, and fails instead of overwriting
            except FileExistsError:
                raise UploadRefused(f"{name} already exists", 409) from None
            except OSError:  # file systems without hard links
                if target.exists():
                    raise UploadRefused(f"{name} already exists", 409) from None
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return rel.as_posix()
