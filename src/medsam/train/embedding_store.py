"""Precomputed image embeddings for decoder-only training (``data.cache_embeddings``).

With the image encoder frozen (``train.mode: decoder``), the encoder's output for a given input
never changes, and computing it is nearly all of a step's cost (on a CPU, ~0.5 s per LiteMedSAM
image against a few milliseconds for the decoder). The store computes each *view* once and
training reads it back:

- one view per training slice (the whole image, as :class:`medsam.predictor.Predictor` sees it);
- one view per object that :func:`medsam.zoom.should_zoom` would segment on a crop, cropped by
  the same deterministic :func:`medsam.zoom.zoom_window` as at inference;
- with :class:`LesionViews` (``data.augment.lesion_prob`` with ``lesion_variants``), for each
  grey-level training slice ``variants`` copies with a synthetic lesion pasted in
  (:mod:`medsam.train.lesions`, drawn from a seed of the run's seed, the slice's path and the
  variant), and the lesion's zoom crop when it is small.

Image augmentations that change pixels at random (flips, gamma, contrast, random zoom offsets)
cannot be cached; the config refuses them together with the store.

Layout of ``FOLDER``: ``part-NNNNNN.f16``, each a (n, C, E, E) float16 raw array (a numpy
memmap) of up to ``part_rows`` consecutive views, and ``index.json`` (the fingerprint, the shape,
the parts, each view's key -> row). The fingerprint covers the encoder weights
(:func:`medsam.embedding_cache.model_fingerprint` of the image encoder), the contract, the zoom
policy and the list of views with their slice files' identities (size and modification time, or
the shard's checksum); a store whose fingerprint differs is rebuilt. Each part is written to a
temporary name, moved into place, then recorded in ``part-NNNNNN.json`` with the fingerprint, so
an interrupted build keeps its finished parts and resumes; ``index.json`` is written last.

The parts are independent tasks: in this process by default, or one task per part on a
:class:`medsam.cluster.DaskEngine` (``medsam embed CONFIG --dask``), where each worker loads the
encoder once from ``encoder.safetensors`` written beside the parts. Training then finds the store
finished and reuses it, so no training rank computes embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..corpus import ManifestRow, load_slice, mask_bbox, slice_identity
from ..io.atomic import write_json
from ..preprocess import Contract
from ..preprocess_fast import prepare_image_fast
from ..zoom import ZoomPolicy, should_zoom, zoom_window

if TYPE_CHECKING:
    from ..cluster import DaskEngine
    from .lesions import Lesion

FORMAT = "medsam-embedding-store/2"
PART_ROWS = 256


def whole_key(row: ManifestRow) -> str:
    return f"whole:{row.path}"


def zoom_key(row: ManifestRow) -> str:
    return f"zoom:{row.path}:{row.label}"


def lesion_key(row: ManifestRow, variant: int) -> str:
    return f"lesion:{row.path}:{variant}"


def lesion_zoom_key(row: ManifestRow, variant: int) -> str:
    return f"lesionzoom:{row.path}:{variant}"


@dataclass(frozen=True)
class LesionViews:
    """Lesion copies of every grey-level training slice: ``variants`` per slice, drawn from
    ``kinds`` with the random state of (``seed``, the slice path's CRC-32, the variant)."""

    variants: int
    seed: int
    kinds: tuple[str, ...]

    def lesion(self, image: np.ndarray, labels: np.ndarray, path: str, variant: int) -> Lesion:
        """Variant ``variant`` of the slice at ``path`` (its image and labels); reproducible."""
        from .lesions import seeded_lesion

        return seeded_lesion(image, labels, self.seed, path, variant, self.kinds)

    def kind(self, path: str, variant: int) -> str:
        """The kind of variant ``variant`` of the slice at ``path``, without drawing it."""
        from .lesions import seeded_lesion_kind

        return seeded_lesion_kind(self.seed, path, variant, self.kinds)


def object_window(mask: np.ndarray, policy: ZoomPolicy) -> tuple[int, int, int, int] | None:
    """The inference crop ``(y0, y1, x0, x1)`` of an object's mask, or None when it is not zoomed."""
    box = mask_bbox(mask)
    if not should_zoom(box, mask.shape, policy):
        return None
    return zoom_window(box, mask.shape, policy.context, policy.min_side)


class EmbeddingStore:
    """Read access to a built store: ``store[key]`` -> (C, E, E) float32 tensor."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: not an embedding store of format {FORMAT}")
        self.fingerprint: str = meta["fingerprint"]
        self.shape = tuple(meta["shape"])
        self.parts: list[str] = meta["parts"]
        self.part_rows = int(meta["part_rows"])
        self.index: dict[str, int] = meta["index"]
        self._arrays: dict[int, np.memmap] = {}  # opened lazily (once per DataLoader worker)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: str) -> torch.Tensor:
        part, row = divmod(self.index[key], self.part_rows)
        array = self._arrays.get(part)
        if array is None:
            n = min(self.part_rows, self.shape[0] - part * self.part_rows)
            array = self._arrays[part] = np.memmap(
                self.folder / self.parts[part], dtype=np.float16, mode="r", shape=(n, *self.shape[1:])
            )
        return torch.from_numpy(np.asarray(array[row], dtype=np.float32))

    def __getstate__(self) -> dict:  # workers reopen the memmaps themselves
        return {**self.__dict__, "_arrays": {}}


_View = tuple[str, ManifestRow, "tuple | None", "int | None"]  # key, row, crop window, lesion variant


def _views(
    corpus: Path, rows: Sequence[ManifestRow], policy: ZoomPolicy | None, lesions: LesionViews | None = None
) -> list[_View]:
    views: list[_View] = []
    seen: set[str] = set()
    for row in rows:
        if whole_key(row) not in seen:
            seen.add(whole_key(row))
            views.append((whole_key(row), row, None, None))
    if policy is not None:
        for row in rows:
            _, label, _ = load_slice(corpus, row)
            window = object_window(label == row.label, policy)
            if window is not None:
                views.append((zoom_key(row), row, window, None))
    if lesions is not None:
        done: set[str] = set()
        for row in rows:
            if row.path in done:
                continue
            done.add(row.path)
            image, label, _ = load_slice(corpus, row)
            if image.ndim != 2:
                continue
            for k in range(lesions.variants):
                views.append((lesion_key(row, k), row, None, k))
                if policy is not None:
                    window = object_window(lesions.lesion(image, label, row.path, k).mask, policy)
                    if window is not None:
                        views.append((lesion_zoom_key(row, k), row, window, k))
    return views


def _fingerprint(
    corpus: Path, views, encoder_fp: str, contract: Contract, policy: ZoomPolicy | None, lesions: LesionViews | None
) -> str:
    h = hashlib.sha256()
    head = {
        "format": FORMAT,
        "encoder": encoder_fp,
        "contract": contract.name,
        "input_size": contract.input_size,
        "zoom": None if policy is None else vars(policy).copy(),
    }
    if lesions is not None:  # absent without lesions: earlier stores keep their fingerprint
        from .lesions import LESION_MODEL_VERSION

        head["lesions"] = {
            "variants": lesions.variants,
            "seed": lesions.seed,
            "kinds": list(lesions.kinds),
            "model": LESION_MODEL_VERSION,
        }
    h.update(json.dumps(head, sort_keys=True).encode())
    for key, row, window, _ in views:
        h.update(f"{key}|{window}|{slice_identity(corpus, row.path)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _PartTask:
    """One part of a store: its views, computed by the model saved in ``encoder``."""

    folder: str
    number: int
    fingerprint: str
    corpus: str
    contract: Contract
    views: tuple[tuple[str, str, tuple | None, int | None], ...]  # (key, slice path, window, lesion variant)
    batch_size: int
    encoder: str = ""  # a saved model (tasks in other processes), "" for the caller's model
    lesions: LesionViews | None = None


def _part_name(number: int) -> str:
    return f"part-{number:06d}.f16"


def _part_done(folder: Path, number: int, fingerprint: str) -> bool:
    rec = folder / f"part-{number:06d}.json"
    try:
        return json.loads(rec.read_text()).get("fingerprint") == fingerprint and (folder / _part_name(number)).is_file()
    except (OSError, ValueError):
        return False


_WORKER_MODELS: dict[str, object] = {}


def _worker_model(path: str):
    """The model saved at ``path``, loaded once per worker process."""
    from ..weights import load_model

    key = f"{path}|{os.stat(path).st_mtime_ns}"
    model = _WORKER_MODELS.get(key)
    if model is None:
        _WORKER_MODELS.clear()
        model = _WORKER_MODELS[key] = load_model(path).eval()  # the worker's GPU where it has one
    return model


@torch.inference_mode()
def _embed_part(task: _PartTask, model=None) -> int:
    """Compute and write one part; returns its number of views."""
    folder = Path(task.folder)
    if model is None:
        model = _worker_model(task.encoder)
    device = next(model.parameters()).device
    tmp = folder / f".{_part_name(task.number)}.tmp-{os.getpid()}"
    array = None
    try:
        for start in range(0, len(task.views), task.batch_size):
            chunk = task.views[start : start + task.batch_size]
            images = []
            for _key, rel, window, variant in chunk:
                image, label, _ = load_slice(task.corpus, rel)
                if variant is not None:
                    assert task.lesions is not None
                    image = task.lesions.lesion(image, label, rel, variant).image
                if window is not None:
                    y0, y1, x0, x1 = window
                    image = np.ascontiguousarray(image[y0:y1, x0:x1])
                images.append(prepare_image_fast(task.contract, image)[0])
            out = model.embed_image(torch.cat(images).to(device)).float().cpu().numpy().astype(np.float16)
            if array is None:
                array = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(len(task.views), *out.shape[1:]))
            array[start : start + len(chunk)] = out
        assert array is not None
        array.flush()
        del array
        os.replace(tmp, folder / _part_name(task.number))
    finally:
        tmp.unlink(missing_ok=True)
    write_json(folder / f"part-{task.number:06d}.json", {"fingerprint": task.fingerprint, "views": len(task.views)})
    return len(task.views)


@torch.inference_mode()
def build_embedding_store(
    model,
    corpus: str | Path,
    rows: Sequence[ManifestRow],
    contract: Contract,
    folder: str | Path,
    policy: ZoomPolicy | None,
    batch_size: int = 8,
    log: Callable[[str], None] = lambda message: None,
    engine: DaskEngine | None = None,
    part_rows: int = PART_ROWS,
    lesions: LesionViews | None = None,
) -> EmbeddingStore:
    """Compute (or reuse, when the fingerprint matches) the embeddings of every view of ``rows``
    (with ``lesions``: their lesion copies too); the parts on ``engine`` when given (see the
    module docstring), finished parts kept."""
    from ..embedding_cache import model_fingerprint

    corpus, folder = Path(corpus), Path(folder)
    views = _views(corpus, rows, policy, lesions)
    fp = _fingerprint(corpus, views, model_fingerprint(model.image_encoder), contract, policy, lesions)
    if (folder / "index.json").is_file():
        try:
            store = EmbeddingStore(folder)
            if store.fingerprint == fp:
                log(f"embedding store {folder}: {len(store)} views, reused")
                return store
        except (ValueError, KeyError, json.JSONDecodeError):
            pass
        (folder / "index.json").unlink()
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probe = model.embed_image(prepare_image_fast(contract, np.zeros((8, 8), np.uint8))[0].to(device))
    shape = (len(views), *probe.shape[1:])
    flat = tuple((k, r.path, w, v) for k, r, w, v in views)
    tasks = [
        _PartTask(str(folder), n, fp, str(corpus), contract, flat[start : start + part_rows], batch_size, "", lesions)
        for n, start in enumerate(range(0, len(views), part_rows))
    ]
    todo = [t for t in tasks if not _part_done(folder, t.number, fp)]
    log(f"embedding store {folder}: {len(views)} views in {len(tasks)} parts, {len(tasks) - len(todo)} done before")
    done = len(views) - sum(len(t.views) for t in todo)
    if engine is None:
        for task in todo:
            done += _embed_part(task, model)
            log(f"embedding store: {done}/{len(views)} views")
    elif todo:
        from ..weights import save_model

        encoder = save_model(model, folder / "encoder.safetensors")
        todo = [replace(t, encoder=str(encoder)) for t in todo]
        failed = []
        for task, n, error in engine.map(_embed_part, todo, name="embed"):
            if error is not None:
                failed.append(f"part {task.number}: {type(error).__name__}: {error}")
                continue
            done += n
            log(f"embedding store: {done}/{len(views)} views")
        if failed:
            raise RuntimeError(f"{len(failed)} part(s) of the embedding store failed (rerun to resume): {failed[0]}")
    meta = {
        "format": FORMAT,
        "fingerprint": fp,
        "shape": list(shape),
        "parts": [_part_name(t.number) for t in tasks],
        "part_rows": part_rows,
        "index": {k: i for i, (k, _, _, _) in enumerate(views)},
    }
    write_json(folder / "index.json", meta)
    for stale in folder.glob("part-*.f16"):
        if stale.name not in meta["parts"]:
            stale.unlink(missing_ok=True)
    model.train(was_training)
    return EmbeddingStore(folder)
