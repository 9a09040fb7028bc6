"""The models a workbench has made: read back from ``DATA/.medsam/models/<job id>/training.json``.

Each finished training job leaves ``model.safetensors`` and ``training.json`` (mode, steps,
learning rate, parent model, held-out images, before/after scores) in its own folder named by the
job id (12 hex digits). :func:`trained_records` reads the folders (skipping anything damaged or
not of that shape); :func:`model_entries` is the list ``GET /train/models`` answers, the model
given at start-up first.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["JOB_ID_RE", "STARTUP_MODEL_ID", "model_entries", "trained_records"]

STARTUP_MODEL_ID = "startup"
JOB_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _scores_or_none(value: Any) -> dict[str, Any] | None:
    """A before/after scores dict read back from ``training.json``, or None if it is not one."""
    keys = ("dsc", "nsd", "n_objects", "nsd_tolerance_mm")
    if isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in keys):
        return {k: value[k] for k in keys}
    return None


def trained_records(models_dir: Path, data_dir: Path) -> list[dict[str, Any]]:
    """The ``training.json`` records of the finished jobs in ``models_dir``, oldest first, each
    with ``checkpoint_rel``: its weights' path relative to the data folder."""
    if not models_dir.is_dir():
        return []
    recs = []
    for d in sorted(models_dir.iterdir()):
        if not (JOB_ID_RE.match(d.name) and d.is_dir() and not d.is_symlink()):
            continue
        try:
            rec = json.loads((d / "training.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("id") != d.name or not (d / "model.safetensors").is_file():
            continue
        rec["checkpoint_rel"] = os.path.relpath(d / "model.safetensors", data_dir).replace(os.sep, "/")
        recs.append(rec)
    return sorted(recs, key=lambda r: (r.get("finished") or "", r["id"]))


def model_entries(
    startup_checkpoint: str | None, startup_fingerprint: str | None, records: list[dict[str, Any]], served: str
) -> list[dict[str, Any]]:
    """The entries of ``GET /train/models``: the start-up model, then one per trained record."""
    out: list[dict[str, Any]] = [
        {
            "id": STARTUP_MODEL_ID,
            "source": "startup",
            "name": "model given at start-up",
            "checkpoint": startup_checkpoint,
            "fingerprint": startup_fingerprint,
            "created": None,
            "parent": None,
            "mode": None,
            "steps": None,
            "lr": None,
            "before": None,
            "after": None,
            "heldout_images": [],
        }
    ]
    for rec in records:
        mode = rec.get("mode") if rec.get("mode") in ("decoder", "lora") else None
        steps = rec.get("steps") if isinstance(rec.get("steps"), int) else None
        lr = rec.get("lr") if isinstance(rec.get("lr"), (int, float)) else None
        parent = rec.get("parent") if isinstance(rec.get("parent"), dict) else {}
        held = rec.get("heldout_images")
        out.append(
            {
                "id": rec["id"],
                "source": "training",
                "name": f"{mode or '?'} fine-tune, {steps} steps",
                "checkpoint": rec["checkpoint_rel"],
                "fingerprint": _str_or_none(rec.get("fingerprint")),
                "created": _str_or_none(rec.get("finished")),
                "parent": _str_or_none(parent.get("id")),
                "mode": mode,
                "steps": steps,
                "lr": lr,
                "before": _scores_or_none(rec.get("before")),
                "after": _scores_or_none(rec.get("after")),
                "heldout_images": [str(i) for i in held] if isinstance(held, list) else [],
            }
        )
    for m in out:
        m["served"] = m["id"] == served
    return out
