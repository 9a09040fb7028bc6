"""Precomputed image embeddings for decoder-only training (``data.cache_embeddings``).

With the image encoder frozen (``train.mode: decoder``), the encoder's output for a given input
never changes, and computing it is nearly all of a step's cost (on a CPU, ~0.5 s per LiteMedSAM
image against a few milliseconds for the decoder). The store computes each *view* once and
training reads it back:

- one view per training slice (the whole image, as :class:`medsam.predictor.Predictor` sees it);
- one view per object that :func:`medsam.zoom.should_zoom` would segment on a crop, cropped by
  the same deterministic :func:`medsam.zoom.zoom_window` as at inference.

Image augmentations that change pixels (flips, gamma, contrast, random zoom offsets) cannot be
cached; the config refuses them together with the store.

Layout of ``FOLDER``: ``embeddings.f16`` (V, C, E, E) float16 raw array (a numpy memmap),
``index.json`` (the fingerprint, the shape and each view's key -> row). The fingerprint covers the
encoder weights (:func:`medsam.embedding_cache.model_fingerprint` of the image encoder), the contract, the zoom
policy and the list of views with their slice files' sizes and modification times; a store whose
fingerprint differs is rebuilt. The array is written to a temporary name and moved into place
when complete, so an interrupted build leaves no store that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..corpus import ManifestRow, load_slice, mask_bbox
from ..preprocess import Contract
from ..preprocess_fast import prepare_image_fast
from ..zoom import ZoomPolicy, should_zoom, zoom_window

FORMAT = "medsam-embedding-store/1"


def whole_key(row: ManifestRow) -> str:
    return f"whole:{row.path}"


def zoom_key(row: ManifestRow) -> str:
    return f"zoom:{row.path}:{row.label}"


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
        self.index: dict[str, int] = meta["index"]
        self._array: np.memmap | None = None  # opened lazily (once per DataLoader worker)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._array is None:
            self._array = np.memmap(self.folder / "embeddings.f16", dtype=np.float16, mode="r", shape=self.shape)
        return torch.from_numpy(np.asarray(self._array[self.index[key]], dtype=np.float32))

    def __getstate__(self) -> dict:  # workers reopen the memmap themselves
        return {**self.__dict__, "_array": None}


def _views(
    corpus: Path, rows: Sequence[ManifestRow], policy: ZoomPolicy | None
) -> list[tuple[str, ManifestRow, tuple | None]]:
    views: list[tuple[str, ManifestRow, tuple | None]] = []
    seen: set[str] = set()
    for row in rows:
        if whole_key(row) not in seen:
            seen.add(whole_key(row))
            views.append((whole_key(row), row, None))
    if policy is not None:
        for row in rows:
            _, label, _ = load_slice(corpus, row)
            window = object_window(label == row.label, policy)
            if window is not None:
                views.append((zoom_key(row), row, window))
    return views


def _fingerprint(corpus: Path, views, encoder_fp: str, contract: Contract, policy: ZoomPolicy | None) -> str:
    h = hashlib.sha256()
    head = {
        "format": FORMAT,
        "encoder": encoder_fp,
        "contract": contract.name,
        "input_size": contract.input_size,
        "zoom": None if policy is None else vars(policy).copy(),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for key, row, window in views:
        st = (corpus / row.path).stat()
        h.update(f"{key}|{window}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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
) -> EmbeddingStore:
    """Compute (or reuse, when the fingerprint matches) the embeddings of every view of ``rows``."""
    from ..embedding_cache import model_fingerprint

    corpus, folder = Path(corpus), Path(folder)
    views = _views(corpus, rows, policy)
    fp = _fingerprint(corpus, views, model_fingerprint(model.image_encoder), contract, policy)
    if (folder / "index.json").is_file():
        try:
            store = EmbeddingStore(folder)
            if store.fingerprint == fp:
                log(f"embedding store {folder}: {len(store)} views, reused")
                return store
        except (ValueError, KeyError, json.JSONDecodeError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probe = model.embed_image(prepare_image_fast(contract, np.zeros((8, 8), np.uint8))[0].to(device))
    shape = (len(views), *probe.shape[1:])
    tmp = folder / "embeddings.f16.partial"
    array = np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape)
    for start in range(0, len(views), batch_size):
        chunk = views[start : start + batch_size]
        images = []
        for _, row, window in chunk:
            image, _, _ = load_slice(corpus, row)
            if window is not None:
                y0, y1, x0, x1 = window
                image = np.ascontiguousarray(image[y0:y1, x0:x1])
            images.append(prepare_image_fast(contract, image)[0])
        out = model.embed_image(torch.cat(images).to(device))
        array[start : start + len(chunk)] = out.float().cpu().numpy().astype(np.float16)
        done = start + len(chunk)
        if done % (batch_size * 25) < batch_size or done == len(views):
            log(f"embedding store: {done}/{len(views)} views")
    array.flush()
    del array
    os.replace(tmp, folder / "embeddings.f16")
    meta = {
        "format": FORMAT,
        "fingerprint": fp,
        "shape": list(shape),
        "index": {k: i for i, (k, _, _) in enumerate(views)},
    }
    part = folder / "index.json.partial"
    part.write_text(json.dumps(meta))
    os.replace(part, folder / "index.json")
    model.train(was_training)
    return EmbeddingStore(folder)
