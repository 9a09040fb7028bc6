"""An on-disk cache of image (slice) embeddings.

Computing an image embedding is the expensive part of MedSAM (the ViT encoder); prompting is
cheap. Segmenting the same volume again (other boxes, other thresholds, a crashed run resumed)
can reuse the embeddings of a previous run::

    cache = EmbeddingCache("~/.cache/medsam/embeddings")
    hit = set_image_cached(predictor, image, cache)    # instead of predictor.set_image(image)

What is stored
--------------
One safetensors file per embedding, ``<folder>/<key[:2]>/<key>.safetensors``, holding one tensor
``"embedding"`` of shape ``(1, C, E, E)`` (C = 256; E = 64 for the official models, so 4 MiB in
float32) in the dtype the model produced, on the CPU, plus string metadata: the full ``key``, the
cache ``format``, the ``medsam_version``, the ``model`` (encoder) fingerprint, the ``contract`` name and
``input_size`` and the image ``shape`` (the last four are informative; the key already covers
them). Files are written to a temporary file in the same folder and moved into place with
``os.replace``, so a reader never sees a half-written entry and concurrent writers of the same key
are harmless.

The key (the signature)
-----------------------
:func:`slice_key` is the SHA-256 of a small JSON header -- cache format, package version,
model fingerprint, contract name, contract input size, array shape and dtype -- followed by the
raw bytes of the (C-contiguous) image array. :func:`model_fingerprint` is the SHA-256 of a
module's state dict (every tensor's name, dtype, shape and bytes, in name order); it is computed
once per module object and memoised, and recomputed automatically when a parameter or buffer was
modified in place or replaced (tracked through the tensors' version counters and storage
pointers). The fingerprint that enters the key is :func:`encoder_fingerprint`: that of the
*image encoder* (plus the model's architecture config), because an embedding depends on nothing
else -- models that differ only in their prompt encoder or mask decoder (a decoder-only
fine-tune) share their embeddings, while any change of the encoder's weights (full or LoRA
fine-tuning) gives new keys. Any change of data, encoder weights, preprocessing or package
version therefore gives a different key: the old entry is simply never looked up again
(``clear()`` removes old files).

An entry read back is checked: it must parse as safetensors, carry the requested key and the
current format in its metadata and hold one finite ``(1, C, E, E)`` tensor. Anything else (a
truncated file, a file copied under another name, a format change) counts as ``rejected``: the
file is deleted and ``get`` returns ``None`` so that the caller recomputes the embedding. A stale
or corrupt entry is never used.

The device is not part of the key: an embedding computed on a GPU is reused on the CPU and vice
versa (they agree up to floating-point rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .io.atomic import write_bytes

__all__ = [
    "CACHE_FORMAT",
    "EmbeddingCache",
    "embedding_id",
    "encoder_fingerprint",
    "model_fingerprint",
    "set_image_cached",
    "slice_key",
]

CACHE_FORMAT = 1
_TENSOR_NAME = "embedding"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

# (name, data pointer, version counter, device type) per tensor of a state dict.
_StateSignature = tuple[tuple[str, int, int, str], ...]

# model -> (state signature, fingerprint); weak so that caching never keeps a model alive.
_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[_StateSignature, str]] = weakref.WeakKeyDictionary()


def _state_signature(state: dict[str, torch.Tensor]) -> _StateSignature:
    """Cheap identity of a state dict's current contents: (name, storage, version) per tensor."""
    sig = []
    for name, t in state.items():
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter
            version = -1
        sig.append((name, t.data_ptr(), version, t.device.type))
    return tuple(sig)


def model_fingerprint(model: torch.nn.Module, *, refresh: bool = False) -> str:
    """SHA-256 (hex) of ``model``'s state dict: names, dtypes, shapes and bytes of every tensor.

    Memoised per model object; recomputed when a tensor was changed in place (its version counter
    moved), replaced (``load_state_dict``, ``.to()``), or when ``refresh`` is true. Hashing a
    ViT-B state dict (360 MB) takes about a second, once.
    """
    state = model.state_dict(keep_vars=True)
    sig = _state_signature(state)
    memo = None if refresh else _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == sig:
        return memo[1]
    h = hashlib.sha256()
    h.update(f"medsam-model-fingerprint/{type(model).__name__}\n".encode())
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    fp = h.hexdigest()
    _FINGERPRINTS[model] = (sig, fp)
    return fp


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint an embedding is keyed by: what the image encoder computes with.

    For a model with an ``image_encoder`` (every :class:`medsam.model.sam.MedSAMModel`): the
    SHA-256 of the encoder's :func:`model_fingerprint` and the model's architecture config
    (hyper-parameters such as the number of heads are not in the weights). Prompt encoder and
    mask decoder do not enter it, so a decoder-only fine-tune keeps the embeddings of its base
    model; a model's ``embedding_extras()`` (tensors outside the encoder that its embedding is
    computed with) do. Any other module: its :func:`model_fingerprint`.
    """
    encoder = getattr(model, "image_encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        return model_fingerprint(model)
    config: Any = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else repr(config)
    h = hashlib.sha256(b"medsam-encoder-fingerprint\n")
    h.update(model_fingerprint(encoder).encode())
    h.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    # Tensors outside the encoder that the embedding is computed with (SAM2: the high-resolution
    # projections and no_mem_embed); small, hashed each time.
    extras = getattr(model, "embedding_extras", None)
    if callable(extras):
        for name, tensor in sorted(extras().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def embedding_id(predictor: Any) -> str:
    """What a predictor's embeddings are keyed by: its encoder's :func:`encoder_fingerprint`, with
    the encoder's precision appended unless it is fp32 (an fp32 key is the bare fingerprint)."""
    fp = encoder_fingerprint(predictor.model)
    precision = getattr(predictor, "precision", "fp32")
    return fp if precision == "fp32" else f"{fp}+{precision}"


def slice_key(model_fp: str, contract: Any, slice_array: np.ndarray) -> str:
    """Cache key (64 hex digits) of the embedding of ``slice_array`` by a model and a contract.

    Args:
        model_fp: :func:`encoder_fingerprint` of the model (any string identifying the weights
            that compute the embedding).
        contract: the predictor's :class:`medsam.preprocess.Contract` (its ``name`` and
            ``input_size`` enter the key), or a ``(name, input_size)`` pair.
        slice_array: the image exactly as given to ``Predictor.set_image``: (H, W) or (H, W, 3),
            any dtype. Its shape, dtype and bytes enter the key.
    """
    if isinstance(contract, tuple):
        name, size = contract
    else:
        name, size = contract.name, contract.input_size
    a = np.ascontiguousarray(slice_array)
    header = json.dumps(
        {
            "format": CACHE_FORMAT,
            "medsam": __version__,
            "model": str(model_fp),
            "contract": str(name),
            "input_size": int(size),
            "shape": list(a.shape),
            "dtype": a.dtype.str,
        },
        sort_keys=True,
    )
    h = hashlib.sha256(header.encode())
    h.update(b"\n")
    if a.size:
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


class EmbeddingCache:
    """A folder of embeddings, one safetensors file per key (see the module docstring).

    Attributes:
        folder: the cache folder (created on first use).
        hits, misses, rejected: counters since creation; ``rejected`` entries (stale or corrupt)
            are also counted as misses.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()
        self.hits = 0
        self.misses = 0
        self.rejected = 0

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r})"

    def path(self, key: str) -> Path:
        """File of ``key``: ``folder/<key[:2]>/<key>.safetensors``."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> torch.Tensor | None:
        """The stored (1, C, E, E) CPU tensor for ``key``, or ``None`` (missing, stale, corrupt)."""
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                tensor = f.get_tensor(_TENSOR_NAME) if names == [_TENSOR_NAME] else None
        except Exception:  # safetensors raises its own error types for truncated/garbage files
            tensor, meta = None, {}
        ok = (
            tensor is not None
            and meta.get("key") == key
            and meta.get("format") == str(CACHE_FORMAT)
            and tensor.ndim == 4
            and tensor.shape[0] == 1
            and tensor.is_floating_point()
            and bool(torch.isfinite(tensor).all())
        )
        if not ok:
            self.rejected += 1
            self.misses += 1
            self._discard(path)
            return None
        self.hits += 1
        return tensor

    def put(self, key: str, embedding: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
        """Store ``embedding`` ((1, C, E, E)) under ``key`` atomically; returns the file path.

        ``metadata`` (string values) is stored alongside for inspection; ``key``, ``format`` and
        ``medsam_version`` are always added.
        """
        from safetensors.torch import save

        path = self.path(key)
        t = embedding.detach().to("cpu").contiguous()
        if t.ndim != 4 or t.shape[0] != 1:
            raise ValueError(f"expected a (1, C, E, E) embedding, got shape {tuple(t.shape)}")
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update(key=key, format=str(CACHE_FORMAT), medsam_version=__version__)
        return write_bytes(path, save({_TENSOR_NAME: t}, metadata=meta))

    def clear(self) -> int:
        """Delete every entry (and stray temporary files); returns the number of entries deleted."""
        n = 0
        if not self.folder.is_dir():
            return 0
        for sub in self.folder.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for p in sub.iterdir():
                if p.suffix == ".safetensors":
                    n += 1
                    self._discard(p)
                elif p.suffix == ".tmp":  # left by a write that was killed: a folder, or a file of older versions
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            try:
                sub.rmdir()
            except OSError:
                pass
        return n

    def __len__(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(1 for _ in self.folder.glob("??/*.safetensors"))

    @staticmethod
    def _discard(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


def set_image_cached(
    predictor: Any, image: np.ndarray, cache: EmbeddingCache | None, model_id: str | None = None
) -> bool:
    """``predictor.set_image(image)`` through ``cache``; returns True on a cache hit.

    On a hit the stored embedding is handed to ``predictor.set_embedding(embedding, (H, W),
    image=image)``;
    on a miss the embedding is computed by ``set_image`` and stored. ``cache=None`` just calls
    ``set_image``. ``predictor`` needs ``model``, ``contract``, ``set_image``, ``set_embedding``
    and ``embedding`` (as :class:`medsam.predictor.Predictor` has). ``model_id``: the
    predictor's :func:`embedding_id`, when the caller already has it (a loop over slices).
    """
    if cache is None:
        predictor.set_image(image)
        return False
    image = np.asarray(image)
    fp = model_id or embedding_id(predictor)
    key = slice_key(fp, predictor.contract, image)
    emb = cache.get(key)
    if emb is not None:
        predictor.set_embedding(emb, tuple(image.shape[:2]), image=image)
        return True
    predictor.set_image(image)
    cache.put(
        key,
        predictor.embedding,
        {
            "model": fp,
            "contract": predictor.contract.name,
            "input_size": predictor.contract.input_size,
            "shape": json.dumps(list(image.shape)),
        },
    )
    return False
