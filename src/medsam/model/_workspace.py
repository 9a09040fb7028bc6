"""Scratch buffers kept from call to call by the CPU inference paths.

Every fresh allocation of more than a few MiB is served by the C library straight from the kernel
and page-faulted in as it is first written; on the project's CPUs that costs about as much as the
arithmetic of a memory-bound operation. The inference paths of the TinyViT encoder and of the mask
decoder therefore keep their few large intermediates in buffers that live on between calls.

There is one set of buffers per process, used by one call at a time: :func:`scratch` hands it to
the first caller and, while it is in use (another thread, or a nested call), gives the others a
private set that is dropped when their call ends. Memory stays bounded however many threads serve
requests, and concurrent calls never share a buffer. Buffers made in inference mode and in plain
no-grad mode are kept apart (a tensor made in one cannot be written in the other).

Contents are undefined when a buffer is handed out; a buffer must not escape to the model's caller.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

# A buffer larger than this is allocated for the call only, not kept.
MAX_KEPT_BYTES = 32 << 20
# A set of kept buffers never holds more than this: past it, the set is emptied and refilled
# (buffers of the current call stay alive through the caller's references until it ends).
MAX_TOTAL_KEPT_BYTES = 256 << 20

_lock = threading.Lock()
_shared: dict = {}


class Scratch:
    """Named buffers: :meth:`buffer` returns the same memory for the same name (grown as needed)."""

    def __init__(self, store: dict) -> None:
        self._store = store

    def buffer(
        self, name: str, shape: tuple[int, ...], like: torch.Tensor, max_kept_bytes: int = MAX_KEPT_BYTES
    ) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device; each
        name is one buffer, so two buffers in use at once need two names. Buffers larger than
        ``max_kept_bytes`` are allocated for the call only."""
        numel = 1
        for s in shape:
            numel *= s
        if numel * like.element_size() > max_kept_bytes:
            return like.new_empty(shape)
        key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self._store.get(key)
        if buf is None or buf.numel() < numel:
            kept = sum(b.numel() * b.element_size() for b in self._store.values())
            if buf is not None:
                kept -= buf.numel() * buf.element_size()
            if kept + numel * like.element_size() > MAX_TOTAL_KEPT_BYTES:
                self._store.clear()
            buf = like.new_empty(numel)
            self._store[key] = buf
        return buf[:numel].view(shape)


@contextlib.contextmanager
def scratch() -> Iterator[Scratch]:
    """The process's kept buffers if no other call is using them, else a private set."""
    owner = _lock.acquire(blocking=False)
    try:
        yield Scratch(_shared if owner else {})
    finally:
        if owner:
            _lock.release()


def clear() -> None:
    """Free the kept buffers (waits for a call that is using them)."""
    with _lock:
        _shared.clear()
