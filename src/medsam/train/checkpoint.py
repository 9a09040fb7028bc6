"""Training checkpoints: everything needed to resume a run exactly, as tensors and primitives.

A checkpoint (``latest.pt``, ``best.pt``) is a dict of tensors, numbers, strings, lists and dicts
only, so it loads with ``torch.load(path, weights_only=True)`` (no pickled objects, nothing run on
load). Keys:

==================  ============================================================================
``format``          ``"medsam-train"``; ``version``: 1
``model``           the model's state dict (official key names; ``*.lora_A``/``*.lora_B`` in LoRA runs)
``model_config``    :class:`medsam.model.ModelConfig` as a dict; ``contract``: preprocessing contract
``mode``            ``full`` / ``decoder`` / ``lora``; ``lora``: the LoRA settings (dict)
``optimizer``       AdamW state dict; ``scheduler``: LR scheduler state; ``scaler``: GradScaler state
``rng``             python / numpy / torch / cuda generator states
``global_step``     optimiser steps done; ``epoch``: current epoch; ``step_in_epoch``: steps done in it
``steps_per_epoch`` and ``global_batch``: the data layout the position refers to
``best_dsc``        best validation DSC so far (or None); ``metrics``: the last validation
``config``          the resolved run config (nested dicts)
==================  ============================================================================

Because ``model`` is a plain state dict under the key ``"model"``, ``medsam.load_model`` also reads
a full/decoder checkpoint directly; ``medsam export`` turns any of them (LoRA merged) into a
safetensors inference checkpoint.

Writes are atomic: the file is written beside the target and moved into place with
``os.replace``, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "medsam-train"
VERSION = 1


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint with ``weights_only=True``; check its format."""
    from ..weights import load_weights_only

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_weights_only(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a medsam training checkpoint (no format={FORMAT!r} entry)")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {state['version']} is newer than this medsam")
    return state


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as weights-only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``None`` (fresh), ``"auto"`` (``run_dir/latest.pt`` if it
    exists) or an explicit path (which must exist). A fresh run refuses a folder holding a run."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest.pt"
    if resume in (None, "", "none", "null"):
        if latest.exists():
            raise FileExistsError(
                f"{run_dir} already holds a run (latest.pt): resume it with train.resume=auto, "
                "or choose another output.dir"
            )
        return None
    if resume == "auto":
        return latest if latest.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: checkpoint not found: {path}")
    return path
