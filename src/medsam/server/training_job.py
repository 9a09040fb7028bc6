"""Human in the loop: fine-tune the served model on the accepted labels, in the background.

One job (``POST /train``) does, in this order, and changes nothing the user sees until the end:

1. **Corpus.** Every image whose label map has a saved version (an accepted label) and at least
   one labelled pixel becomes one case of a corpus in ``medsam train``'s format, written with the
   curation code itself (:func:`medsam.corpus.write_case` and
   :func:`~medsam.corpus.index_corpus`): one ``.npz`` per labelled slice holding the
   slice *exactly as the model sees it in the workbench* (the datastore's uint8 model input) and
   its label map, one manifest row per (slice, label). The label files are read from disk again
   (not from the server's cache), inside ``.medsam/labels`` only.
2. **Split** by image, deterministic and stable: an image is held out when the first 8 bytes of
   ``sha256("medsam-holdout/" + image id)``, read as a fraction of 2**64, fall below
   :data:`HOLDOUT_FRACTION`. Adding images never moves an existing one, and no slice of a
   held-out volume is trained on. At least one image is held out (the one with the smallest
   hash) and at least one is trained on; fewer than :data:`MIN_ACCEPTED_IMAGES` accepted images
   are refused (422). Held-out cases carry the manifest split ``test``, training cases ``train``.
3. **Before.** The served model is scored on the held-out labels (:func:`score_heldout`).
4. **Training**: ``medsam train`` (:mod:`medsam.cli.train`) in a child process, from the served
   weights (written to ``base.safetensors``), ``train.mode`` ``decoder`` (default) or ``lora``,
   a few steps (default :data:`DEFAULT_STEPS`), batch ``min(4, training objects)``, no
   validation inside the run (the held-out split is scored here instead), checkpoints in
   ``DATA/.medsam/models/<job id>/run/``, exported (LoRA merged) to
   ``DATA/.medsam/models/<job id>/model.safetensors``.
5. **After.** The new model is scored with the same function on the same objects.
6. **Switch.** The new model is served (:meth:`SegmentationEngine.switch_model`) and recorded in
   ``training.json`` next to its weights, with the before/after scores. The previous model stays
   selectable (``POST /train/models/select``); the model given at start-up is ``"startup"``.

A job that fails or is cancelled at any step leaves the served model unchanged.

Why a child process for the training, and a thread for the rest. The job is driven by a thread
of the server (it only waits for the child, reads its log, and scores, which needs the served
model object). The training itself runs as a separate ``python -m medsam train``
process because (a) ``torch.set_num_threads`` is process-wide: a training thread could not be
limited to fewer cores without also slowing the interactive model, whereas the child gets its
own ``OMP_NUM_THREADS`` (half the cores by default) and a lower CPU priority (nice +10); (b) its
Python loop does not compete for the server's GIL; (c) a crash or out-of-memory in training
kills the child, not the server, and cancelling is terminating it; (d) it is literally
``medsam train`` on the written corpus, the command a user would run. The cost is a few
seconds of start-up and the base weights on disk (deleted when the job ends).

Embeddings: the embedding cache is keyed by the image encoder's fingerprint
(:func:`medsam.embedding_cache.encoder_fingerprint`), so a decoder-only model shares every
cached embedding with its base (the "after" scoring and the first prompts after the switch cost
no encoder call), and a LoRA model, whose encoder changed, never sees one of them.

Scores (:func:`score_heldout`): per object (one label on one held-out slice), the box prompt is
the label's bounding box on that slice (inclusive corners; a one-pixel-wide box is closed on the
far side), the mask comes from :class:`medsam.predictor.Predictor` on the slice, and DSC and NSD
(2 mm, the slice's pixel spacing) from :mod:`medsam.metrics`; the summary is the mean over
objects. At most :data:`MAX_SCORED_SLICES` held-out slices are scored (evenly spaced), the same
ones for both models.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_output
from ..lifecycle import PARENT_PID_ENV
from .labels import LabelStore, now_iso
from .security import UnsafePathError, resolve_inside, safe_relative_path

__all__ = [
    "DEFAULT_STEPS",
    "HOLDOUT_FRACTION",
    "MAX_STEPS",
    "MIN_ACCEPTED_IMAGES",
    "STARTUP_MODEL_ID",
    "TrainingJob",
    "TrainingManager",
    "TrainingRefused",
    "holdout_fraction_of",
    "restore_encoder",
    "score_heldout",
    "split_images",
    "summarize_scores",
    "write_accepted_corpus",
]

HOLDOUT_FRACTION = 0.2
MIN_ACCEPTED_IMAGES = 2
DEFAULT_STEPS = 20
MAX_STEPS = 2000
DEFAULT_LR = 1e-4
MAX_LR = 1e-2
MAX_SCORED_SLICES = 64
NSD_TOLERANCE_MM = 2.0
STARTUP_MODEL_ID = "startup"
DATASET = "workbench"
TRAIN_SPLIT, HELDOUT_SPLIT = "train", "test"
_JOB_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_LOG_LINES = 200
_ENV_DROP = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)
# Overall progress: where each phase starts and ends (the page shows one bar).
_PHASES = {
    "queued": (0.0, 0.0),
    "corpus": (0.0, 0.05),
    "scoring before": (0.05, 0.15),
    "training": (0.15, 0.85),
    "exporting": (0.85, 0.88),
    "scoring after": (0.88, 0.98),
    "switching": (0.98, 1.0),
    "finished": (1.0, 1.0),
}


class TrainingRefused(Exception):
    """A request the training API answers with ``status`` (404, 409, 422) and this message."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _JobError(Exception):
    """Fails the running job with an HTTP-like status."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class _Cancelled(Exception):
    pass


# ----------------------------------------------------------------------------- split
def holdout_fraction_of(image_id: str) -> float:
    """The image's place in [0, 1): first 8 bytes of ``sha256("medsam-holdout/" + id)`` / 2**64."""
    digest = hashlib.sha256(("medsam-holdout/" + image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def split_images(image_ids: list[str], fraction: float = HOLDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` image ids: held out when :func:`holdout_fraction_of` < ``fraction``.

    With two or more images, at least one lands on each side: if none is held out, the image
    with the smallest value is; if all are, the one with the largest value is trained on.
    """
    ids = sorted(set(image_ids))
    if len(ids) < 2:
        raise ValueError("need at least two images to split")
    value = {i: holdout_fraction_of(i) for i in ids}
    held = [i for i in ids if value[i] < fraction]
    if not held:
        held = [min(ids, key=value.__getitem__)]
    if len(held) == len(ids):
        held.remove(max(ids, key=value.__getitem__))
    train = [i for i in ids if i not in held]
    return train, sorted(held)


# ----------------------------------------------------------------------------- corpus
@dataclass
class CorpusInfo:
    folder: Path
    train_images: list[str]
    heldout_images: list[str]
    train_objects: int
    heldout_objects: int
    case_to_image: dict[str, str]
    skipped: list[str] = field(default_factory=list)  # accepted, but no labelled pixel
    train_slices: int = 0


def _case_name(image_id: str) -> str:
    """A folder-safe, unique case name for an image id."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)[:80]
    if not safe[:1].isalnum():
        safe = "i" + safe
    return f"{safe}-{hashlib.sha256(image_id.encode('utf-8')).hexdigest()[:8]}"


def read_accepted_label(labels: LabelStore, image_id: str, like) -> tuple[dict, np.ndarray]:
    """``(sidecar record, label map)`` of an accepted image, read from its file on disk.

    The file named by the sidecar must lie inside the labels folder. Raises :class:`_JobError`
    (422) for an unreadable or mismatched file.
    """
    from ..io import read_image

    try:
        rec = labels.record(image_id)
    except RuntimeError as exc:
        raise _JobError(str(exc), 422) from None
    name = rec.get("label_file")
    if not rec.version or not name:
        raise _JobError(f"{image_id!r} has no saved label", 422)
    try:
        path = resolve_inside(labels.dir.resolve(), safe_relative_path(str(name)))
    except UnsafePathError as exc:
        raise _JobError(f"label file of {image_id!r} refused: {exc}", 422) from None
    try:
        array = np.asarray(read_image(path).array)
    except Exception as exc:  # any reader failure: a damaged file
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise _JobError(f"cannot read the label file of {image_id!r}: {first}", 422) from None
    if array.shape != tuple(like.spatial_shape):
        raise _JobError(f"label file of {image_id!r} has shape {array.shape}, the image {like.spatial_shape}", 422)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise _JobError(f"label file of {image_id!r} holds values outside 0..255", 422)
    return rec, array.astype(np.uint8, copy=False)


def write_accepted_corpus(
    datastore,
    labels: LabelStore,
    image_ids: list[str],
    folder: Path,
    modality: str | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> CorpusInfo:
    """Write the accepted labels of ``image_ids`` as a corpus in ``folder`` (module docstring).

    Images without a labelled pixel are skipped; the split is made over the rest. Raises
    :class:`_JobError` (422) when fewer than :data:`MIN_ACCEPTED_IMAGES` remain.
    """
    from ..corpus import index_corpus, write_case

    usable: dict[str, tuple[Any, dict, np.ndarray, list[int]]] = {}
    skipped = []
    for image_id in image_ids:
        if cancelled():
            raise _Cancelled()
        try:
            loaded = datastore.load(image_id)
        except Exception as exc:  # vanished or unreadable image
            raise _JobError(f"cannot read image {image_id!r}: {str(exc).splitlines()[0][:300]}", 422) from None
        rec, label = read_accepted_label(labels, image_id, loaded.image)
        planes = label if loaded.image.is_volume else label[None]
        kept = [int(k) for k in np.flatnonzero(planes.reshape(planes.shape[0], -1).any(axis=1))]
        if kept:
            usable[image_id] = (loaded, rec, planes, kept)
        else:
            skipped.append(image_id)
    if len(usable) < MIN_ACCEPTED_IMAGES:
        raise _JobError(
            f"need accepted labels on at least {MIN_ACCEPTED_IMAGES} images (one to train on, one held out "
            f"to score), found {len(usable)} with a labelled pixel",
            422,
        )
    train, held = split_images(list(usable))
    heldout = set(held)
    folder.mkdir(parents=True, exist_ok=True)
    case_to_image = {}
    counts = {TRAIN_SPLIT: 0, HELDOUT_SPLIT: 0}
    slice_counts = {TRAIN_SPLIT: 0, HELDOUT_SPLIT: 0}
    for image_id, (loaded, rec, planes, kept) in usable.items():
        if cancelled():
            raise _Cancelled()
        image = loaded.image
        split = HELDOUT_SPLIT if image_id in heldout else TRAIN_SPLIT
        names = {int(d["value"]): str(d["name"]) for d in rec.get("labels") or [] if "value" in d and "name" in d}
        present = sorted(int(v) for v in np.unique(planes[kept]) if v)
        case = _case_name(image_id)
        written = write_case(
            folder,
            DATASET,
            case,
            ((k, loaded.model_slice(k), planes[k]) for k in kept),
            list(image.spacing_zyx)[-2:],
            {
                "modality": image.modality or modality or "unknown",
                "label_source": "manual (workbench)",
                "source": {
                    "image_id": image_id,
                    "label_file": rec.get("label_file"),
                    "label_version": rec.version,
                    "label_sha256": rec.get("label_sha256"),
                },
                "geometry": {
                    "shape": list(image.spatial_shape),
                    "is_color": image.is_color,
                    "spacing_zyx": list(image.spacing_zyx),
                    "source_format": image.source_format,
                },
                "normalization": {
                    "recipe": "workbench model input (medsam.segment.to_model_input)",
                    "modality": modality,
                },
                "label_names": {str(v): names.get(v, f"label {v}") for v in present},
                "split": split,
            },
        )
        counts[split] += int(written["n_objects"])
        slice_counts[split] += int(written["n_slices"])
        case_to_image[case] = image_id
    index_corpus(
        folder,
        [
            {
                "name": DATASET,
                "modality": "mixed",
                "images": str(datastore.root),
                "labels": str(labels.dir),
                "label_source": "manual (workbench)",
                "split": {"train": 1 - HOLDOUT_FRACTION, "val": 0.0, "test": HOLDOUT_FRACTION},
                "description": "accepted labels of the MedSAM workbench; split by a hash of the image id",
            }
        ],
    )
    return CorpusInfo(
        folder,
        train,
        held,
        counts[TRAIN_SPLIT],
        counts[HELDOUT_SPLIT],
        case_to_image,
        skipped,
        slice_counts[TRAIN_SPLIT],
    )


# ----------------------------------------------------------------------------- scores
def _box_of(mask: np.ndarray) -> list[float]:
    """Inclusive [x0, y0, x1, y1] of a mask; a one-pixel-wide side is closed on the far side."""
    H, W = mask.shape
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    x0, y0, x1, y1 = float(xs[0]), float(ys[0]), float(xs[-1]), float(ys[-1])
    if x1 <= x0:
        x1 = min(x0 + 1, W)
    if y1 <= y0:
        y1 = min(y0 + 1, H)
    return [x0, y0, x1, y1]


def score_heldout(
    model,
    corpus: Path,
    cache=None,
    cancelled: Callable[[], bool] = lambda: False,
    max_slices: int = MAX_SCORED_SLICES,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """DSC and NSD of ``model`` on every object of the corpus's held-out split (module docstring).

    Returns one dict per object: ``case``, ``slice``, ``label``, ``label_name``, ``dsc``, ``nsd``.
    ``cache``: an :class:`~medsam.embedding_cache.EmbeddingCache` for the slice embeddings.
    """
    from ..corpus import load_slice, read_manifest
    from ..embedding_cache import set_image_cached
    from ..metrics import dice_score, normalized_surface_dice
    from ..predictor import Predictor

    groups: OrderedDict[str, list] = OrderedDict()
    for row in read_manifest(corpus, HELDOUT_SPLIT):
        groups.setdefault(row.path, []).append(row)
    paths = list(groups)
    if len(paths) > max_slices:
        picks = sorted(set(np.linspace(0, len(paths) - 1, max_slices).round().astype(int).tolist()))
        paths = [paths[i] for i in picks]
    predictor = Predictor(model)
    out = []
    for n, path in enumerate(paths):
        if cancelled():
            raise _Cancelled()
        rows = groups[path]
        image, label, spacing = load_slice(corpus, rows[0])
        gts = [label == r.label for r in rows]
        set_image_cached(predictor, image, cache)
        pred = predictor.predict(boxes=np.asarray([_box_of(g) for g in gts], dtype=np.float64))
        for r, mask, gt in zip(rows, pred.masks, gts):
            out.append(
                {
                    "case": r.case,
                    "slice": int(r.slice),
                    "label": int(r.label),
                    "label_name": r.label_name,
                    "dsc": float(dice_score(mask, gt)),
                    "nsd": float(normalized_surface_dice(mask, gt, spacing, NSD_TOLERANCE_MM)),
                }
            )
        if progress is not None:
            progress(n + 1, len(paths))
    predictor.reset_image()
    return out


def restore_encoder(base, new) -> list[str]:
    """Copy ``base``'s image-encoder state into ``new`` where they differ; returns the names.

    A decoder-only run must leave the encoder as it was (``medsam train`` keeps a frozen encoder
    in eval mode, so BatchNorm statistics do not move); this is a safeguard that keeps the
    encoder, and so every cached embedding, exactly the base model's whatever the run did.
    """
    import torch

    old_state = base.image_encoder.state_dict()
    new_state = new.image_encoder.state_dict()
    changed = [k for k, v in new_state.items() if k not in old_state or not torch.equal(v.cpu(), old_state[k].cpu())]
    if changed:
        new.image_encoder.load_state_dict(old_state)
    return changed


def summarize_scores(rows: list[dict]) -> dict:
    """Mean DSC and NSD over objects."""
    return {
        "dsc": float(np.mean([r["dsc"] for r in rows])) if rows else 0.0,
        "nsd": float(np.mean([r["nsd"] for r in rows])) if rows else 0.0,
        "n_objects": len(rows),
        "nsd_tolerance_mm": NSD_TOLERANCE_MM,
    }


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def _scores_or_none(value) -> dict | None:
    """A ``summarize_scores`` dict read back from ``training.json``, or None if it is not one."""
    keys = ("dsc", "nsd", "n_objects", "nsd_tolerance_mm")
    if isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in keys):
        return {k: value[k] for k in keys}
    return None


# ----------------------------------------------------------------------------- the job
@dataclass
class TrainingJob:
    """One training job; :meth:`info` is its status (``TrainJobStatus`` in the API)."""

    mode: str
    steps: int
    lr: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"
    phase: str = "queued"
    step: int = 0
    loss: float | None = None
    phase_done: float = 0.0
    train_images: list[str] = field(default_factory=list)
    heldout_images: list[str] = field(default_factory=list)
    train_objects: int = 0
    heldout_objects: int = 0
    before: dict | None = None
    after: dict | None = None
    objects: list[dict] = field(default_factory=list)
    model_before: str | None = None
    model_after: str | None = None
    switched: bool = False
    error: str | None = None
    error_status: int | None = None
    created: str = field(default_factory=now_iso)
    finished: str | None = None
    cancelled: bool = False
    log: deque = field(default_factory=lambda: deque(maxlen=_LOG_LINES))
    _t0: float = field(default_factory=time.monotonic)
    _t1: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def say(self, text: str) -> None:
        self.log.append(f"[{time.strftime('%H:%M:%S')}] {text}")

    def set_phase(self, phase: str) -> None:
        self.phase, self.phase_done = phase, 0.0
        self.say(phase)

    def progress(self) -> float:
        lo, hi = _PHASES.get(self.phase, (0.0, 0.0))
        return round(lo + (hi - lo) * min(1.0, max(0.0, self.phase_done)), 4)

    def info(self, tail: int = 40) -> dict:
        end = self._t1 if self._t1 is not None else time.monotonic()
        return {
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "mode": self.mode,
            "steps": self.steps,
            "lr": self.lr,
            "step": self.step,
            "progress": self.progress(),
            "loss": self.loss,
            "log_tail": list(self.log)[-tail:],
            "train_images": list(self.train_images),
            "heldout_images": list(self.heldout_images),
            "train_objects": self.train_objects,
            "heldout_objects": self.heldout_objects,
            "before": self.before,
            "after": self.after,
            "objects": list(self.objects),
            "model_before": self.model_before,
            "model_after": self.model_after,
            "switched": self.switched,
            "error": self.error,
            "error_status": self.error_status,
            "created": self.created,
            "finished": self.finished,
            "elapsed_s": round(end - self._t0, 3),
        }


class TrainingManager:
    """Training jobs (one at a time) and the models they made (module docstring).

    Args:
        settings: the server settings (``DATA/.medsam/models`` holds the models).
        datastore, labels, engine: the workbench's (the engine serves the model).
        threads: CPU threads of the training process (default: half the cores, at least 1).
        python: interpreter that runs ``medsam train`` (default: this one).
    """

    def __init__(
        self, settings, datastore, labels: LabelStore, engine, threads: int | None = None, python: str | None = None
    ) -> None:
        self.settings = settings
        self.datastore = datastore
        self.labels = labels
        self.engine = engine
        self.models_dir = Path(settings.state_dir) / "models"
        self.threads = max(1, int(threads) if threads else (os.cpu_count() or 2) // 2)
        self.python = python or sys.executable
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, TrainingJob] = OrderedDict()
        self._threads: dict[str, threading.Thread] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self.served = STARTUP_MODEL_ID
        self._startup_model = None  # kept once another model is served, to switch back
        self._startup_checkpoint = engine.checkpoint

    # ------------------------------------------------------------------ jobs
    def active_job(self) -> TrainingJob | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.active), None)

    def start(self, mode: str, steps: int, lr: float) -> TrainingJob:
        """Check the request and start a job in a background thread; raises TrainingRefused."""
        if mode not in ("decoder", "lora"):
            raise TrainingRefused("mode must be 'decoder' or 'lora'", 422)
        running = self.active_job()
        if running is not None:
            raise TrainingRefused(f"a training job is running ({running.id}); wait for it or cancel it", 409)
        accepted = self.accepted_images()
        if len(accepted) < MIN_ACCEPTED_IMAGES:
            raise TrainingRefused(
                f"too few accepted labels: need labels on at least {MIN_ACCEPTED_IMAGES} images "
                f"(one to train on, one held out to score the models), found {len(accepted)}; "
                "accept masks on more images first",
                422,
            )
        with self._lock:
            running = next((j for j in self._jobs.values() if j.active), None)
            if running is not None:
                raise TrainingRefused(f"a training job is running ({running.id}); wait for it or cancel it", 409)
            job = TrainingJob(mode=mode, steps=int(steps), lr=float(lr))
            job.model_before = self.served
            self._jobs[job.id] = job
            while len(self._jobs) > 50:
                self._jobs.popitem(last=False)
            for old_id in [i for i, t in self._threads.items() if not t.is_alive()]:
                del self._threads[old_id]
            thread = threading.Thread(
                target=self._run, args=(job, accepted), name=f"medsam-train-{job.id}", daemon=True
            )
            self._threads[job.id] = thread
        job.say(f"queued: {mode}, {steps} steps, lr {lr:g}; {len(accepted)} accepted images")
        thread.start()
        return job

    def get(self, job_id: str) -> TrainingJob | None:
        return self._jobs.get(job_id)

    def all(self) -> list[TrainingJob]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> TrainingJob | None:
        job = self._jobs.get(job_id)
        if job is not None and job.active:
            job.cancelled = True
            proc = self._procs.get(job_id)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        return job

    def shutdown(self, timeout: float = 20.0) -> None:
        """Cancel a running job and wait for its thread (the served model stays as it is)."""
        for job in self.all():
            if job.active:
                self.cancel(job.id)
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def accepted_images(self) -> list[str]:
        """Ids of images with a saved label version."""
        return [i for i in self.datastore.list_ids() if self.labels.status(i)[0] == "labelled"]

    # ------------------------------------------------------------------ models
    def models(self) -> list[dict]:
        """The startup model and every finished training's model, oldest first."""
        from ..embedding_cache import model_fingerprint

        if self.served == STARTUP_MODEL_ID:
            fp = self.engine.fingerprint()
        else:
            fp = model_fingerprint(self._startup_model)
        ckpt = self._startup_checkpoint
        out = [
            {
                "id": STARTUP_MODEL_ID,
                "source": "startup",
                "name": "model given at start-up",
                "checkpoint": str(ckpt) if ckpt else None,
                "fingerprint": fp,
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
        for rec in self._trained_records():
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
            m["served"] = m["id"] == self.served
        return out

    def _trained_records(self) -> list[dict]:
        if not self.models_dir.is_dir():
            return []
        recs = []
        for d in sorted(self.models_dir.iterdir()):
            if not (_JOB_ID_RE.match(d.name) and d.is_dir() and not d.is_symlink()):
                continue
            try:
                rec = json.loads((d / "training.json").read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(rec, dict) or rec.get("id") != d.name or not (d / "model.safetensors").is_file():
                continue
            rec["checkpoint_rel"] = os.path.relpath(d / "model.safetensors", self.settings.data_dir).replace(
                os.sep, "/"
            )
            recs.append(rec)
        return sorted(recs, key=lambda r: (r.get("finished") or "", r["id"]))

    def select(self, model_id: str) -> None:
        """Serve the model ``model_id`` (404 unknown, 409 while a job runs)."""
        refused = TrainingRefused("a training job is running; switch models after it ends", 409)
        if self.active_job() is not None:
            raise refused
        if model_id == self.served:
            return
        model, path = None, self._startup_checkpoint
        if model_id != STARTUP_MODEL_ID:
            if not _JOB_ID_RE.match(model_id) or not any(r["id"] == model_id for r in self._trained_records()):
                raise TrainingRefused(f"no model {model_id!r}", 404)
            from ..weights import load_model

            path = self.models_dir / model_id / "model.safetensors"
            try:
                model = load_model(path, device=self.engine.model.device)
            except Exception as exc:  # a damaged file: say so, serve what was served
                raise TrainingRefused(
                    f"cannot load model {model_id!r}: {str(exc).splitlines()[0][:300]}", 500
                ) from None
        with self._lock:  # no job may start (or switch) in between
            if any(j.active for j in self._jobs.values()):
                raise refused
            if model_id == STARTUP_MODEL_ID:
                if self.served != STARTUP_MODEL_ID:
                    self.engine.switch_model(self._startup_model, path)
                    self.served = STARTUP_MODEL_ID
            else:
                self._serve(model_id, model, path)

    def _serve(self, model_id: str, model, checkpoint: Path) -> None:
        if self.served == STARTUP_MODEL_ID and self._startup_model is None:
            self._startup_model = self.engine.model
        self.engine.switch_model(model, checkpoint)
        self.served = model_id

    # ------------------------------------------------------------------ the work
    def _run(self, job: TrainingJob, accepted: list[str]) -> None:
        job.state = "running"
        job_dir = self.models_dir / job.id
        try:
            self._work(job, accepted, job_dir)
            job.state = "done"
        except _Cancelled:
            job.state = "cancelled"
            job.say("cancelled; the served model is unchanged")
        except _JobError as exc:
            job.state, job.error, job.error_status = "failed", str(exc), exc.status
            job.say(f"failed: {exc}")
        except Exception as exc:  # a failed job must never take the server down
            job.state, job.error, job.error_status = "failed", f"{type(exc).__name__}: {exc}", 500
            job.say(f"failed: {job.error}")
        finally:
            if job.cancelled and job.state == "done":  # cancelled too late to stop: it finished
                job.say("finished before the cancel took effect")
            self._procs.pop(job.id, None)
            for leftover in (job_dir / "base.safetensors", job_dir / "base.json", job_dir / "run" / "latest.pt"):
                leftover.unlink(missing_ok=True)
            if job.state != "done" and job_dir.is_dir():  # never listed as a model
                (job_dir / "training.json").unlink(missing_ok=True)
                (job_dir / "model.safetensors").unlink(missing_ok=True)
            job.finished = now_iso()
            job._t1 = time.monotonic()

    def _check(self, job: TrainingJob) -> None:
        if job.cancelled:
            raise _Cancelled()

    def _work(self, job: TrainingJob, accepted: list[str], job_dir: Path) -> None:
        from ..embedding_cache import model_fingerprint
        from ..weights import load_model, save_model

        job_dir.mkdir(parents=True, exist_ok=True)
        cancelled = lambda: job.cancelled
        base_id = job.model_before
        base_model = self.engine.model

        job.set_phase("corpus")
        corpus = write_accepted_corpus(
            self.datastore, self.labels, accepted, job_dir / "corpus", self.settings.modality, cancelled
        )
        job.train_images, job.heldout_images = corpus.train_images, corpus.heldout_images
        job.train_objects, job.heldout_objects = corpus.train_objects, corpus.heldout_objects
        job.say(
            f"corpus: {len(corpus.train_images)} training images ({corpus.train_objects} objects), "
            f"{len(corpus.heldout_images)} held out ({corpus.heldout_objects} objects)"
            + (f"; skipped without labelled pixels: {', '.join(corpus.skipped)}" if corpus.skipped else "")
        )
        if corpus.train_objects == 0 or corpus.heldout_objects == 0:
            raise _JobError("no object to train on or to score", 422)

        def scored(p: float) -> None:
            job.phase_done = p

        job.set_phase("scoring before")
        before_rows = score_heldout(
            base_model, corpus.folder, self.engine.cache, cancelled, progress=lambda d, t: scored(d / t)
        )
        job.before = summarize_scores(before_rows)
        job.objects = [self._object_row(r, corpus, before=r) for r in before_rows]
        job.say(
            f"before ({base_id}): DSC {job.before['dsc']:.4f}, NSD {job.before['nsd']:.4f} "
            f"on {job.before['n_objects']} held-out objects"
        )
        self._check(job)

        job.set_phase("training")
        base_path = save_model(base_model, job_dir / "base.safetensors")
        run_dir = job_dir / "run"
        config_path = self._write_config(job, corpus, base_path, run_dir, base_model)
        self._train(job, config_path, job_dir, run_dir)

        job.set_phase("exporting")
        from ..train.export import export_checkpoint

        model_path = export_checkpoint(run_dir / "latest.pt", job_dir / "model.safetensors")
        new_model = load_model(model_path, device=base_model.device)
        if job.mode == "decoder":
            restored = restore_encoder(base_model, new_model)
            if restored:
                extra = json.loads(model_path.with_suffix(".json").read_text())
                save_model(
                    new_model, model_path, extra={k: v for k, v in extra.items() if k not in ("config", "contract")}
                )
                job.say(
                    f"decoder-only: restored {len(restored)} image-encoder tensors the run had changed "
                    f"(BatchNorm statistics, e.g. {restored[0]}): the encoder stays the base model's"
                )
        self._check(job)

        job.set_phase("scoring after")
        after_rows = score_heldout(
            new_model, corpus.folder, self.engine.cache, cancelled, progress=lambda d, t: scored(d / t)
        )
        job.after = summarize_scores(after_rows)
        job.objects = [self._object_row(a, corpus, before=b, after=a) for b, a in zip(before_rows, after_rows)]
        job.say(f"after: DSC {job.after['dsc']:.4f}, NSD {job.after['nsd']:.4f}")
        self._check(job)

        job.set_phase("switching")
        record = {
            "format": 1,
            "id": job.id,
            "created": job.created,
            "finished": now_iso(),
            "mode": job.mode,
            "steps": job.steps,
            "lr": job.lr,
            "checkpoint": "model.safetensors",
            "fingerprint": model_fingerprint(new_model),
            "parent": {
                "id": base_id,
                "fingerprint": model_fingerprint(base_model),
                "checkpoint": str(self.engine.checkpoint) if self.engine.checkpoint else None,
            },
            "split": {"method": "sha256('medsam-holdout/' + image id) < fraction", "fraction": HOLDOUT_FRACTION},
            "train_images": job.train_images,
            "heldout_images": job.heldout_images,
            "train_objects": job.train_objects,
            "heldout_objects": job.heldout_objects,
            "before": job.before,
            "after": job.after,
            "objects": job.objects,
        }
        with atomic_output(job_dir / "training.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        with self._lock:
            if job.cancelled:
                raise _Cancelled()
            self._serve(job.id, new_model, model_path)
        job.model_after = job.id
        job.switched = True
        job.set_phase("finished")
        job.say(f"now serving {job.id}; the previous model ({base_id}) stays selectable")

    @staticmethod
    def _object_row(r: dict, corpus: CorpusInfo, before: dict | None = None, after: dict | None = None) -> dict:
        return {
            "image_id": corpus.case_to_image.get(r["case"], r["case"]),
            "slice_index": r["slice"],
            "label": r["label"],
            "label_name": r["label_name"],
            "dsc_before": before["dsc"] if before else None,
            "nsd_before": before["nsd"] if before else None,
            "dsc_after": after["dsc"] if after else None,
            "nsd_after": after["nsd"] if after else None,
        }

    def _write_config(self, job: TrainingJob, corpus: CorpusInfo, base: Path, run_dir: Path, base_model) -> Path:
        from ..train.config import TrainConfig, dump_config

        batch = max(1, min(4, corpus.train_objects))
        data = {
            "corpus": str(corpus.folder),
            "train_split": TRAIN_SPLIT,
            "val_split": None,
            "batch_size": batch,
            "workers": 0,
            "clicks": 3,
        }
        if job.mode == "decoder" and corpus.train_slices <= job.steps * batch:
            # Fewer slices than samples to draw: embed each once (medsam.train.embedding_store)
            # instead of once per sample.
            data["cache_embeddings"] = str(run_dir.parent / "embeddings")
        cfg = TrainConfig.from_dict(
            {
                "model": {"arch": None, "checkpoint": str(base), "contract": None},
                "data": data,
                "train": {
                    "mode": job.mode,
                    "epochs": 0,
                    "max_steps": job.steps,
                    "lr": job.lr,
                    "seed": 0,
                    "device": "cuda" if base_model.device.type == "cuda" else "cpu",
                    "log_every": 1,
                    "save_every": 0,
                    "progress": False,
                },
                "output": {"dir": str(run_dir), "tensorboard": False},
            }
        )
        path = run_dir.parent / "config.yaml"
        path.write_text(dump_config(cfg))
        return path

    def _train(self, job: TrainingJob, config_path: Path, job_dir: Path, run_dir: Path) -> None:
        """Run ``medsam train`` in a child process; follow its log and metrics until it exits."""
        import medsam

        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        src = str(Path(medsam.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log_path = job_dir / "train.log"
        cmd = [self.python, "-m", "medsam", "train", str(config_path)]
        env[PARENT_PID_ENV] = str(os.getpid())  # the child ends with the server (medsam.lifecycle)
        job.say("medsam train " + config_path.name + f" ({self.threads} threads)")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(job_dir), env=env
            )
        self._procs[job.id] = proc
        try:
            if hasattr(os, "setpriority"):
                os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        except OSError:
            pass
        if job.cancelled:  # cancelled while starting
            proc.terminate()
        offset = 0
        metrics = run_dir / "metrics.csv"
        while True:
            rc = proc.poll()
            offset = self._follow_log(job, log_path, offset)
            self._read_metrics(job, metrics)
            if rc is not None:
                break
            time.sleep(0.2)
        if job.cancelled:
            raise _Cancelled()
        if rc != 0:
            lines = [ln for ln in job.log if "medsam: error:" in ln] or list(job.log)
            last = lines[-1].split("] ", 1)[-1] if lines else ""
            raise _JobError(f"training process exited with status {rc}: {last}", 500)
        if not (run_dir / "latest.pt").is_file():
            raise _JobError("training finished without writing a checkpoint", 500)

    @staticmethod
    def _follow_log(job: TrainingJob, path: Path, offset: int) -> int:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return offset
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode("utf-8", "replace").splitlines():
            if line.strip():
                job.log.append(f"[train] {line.rstrip()}")
        return offset + end

    @staticmethod
    def _read_metrics(job: TrainingJob, path: Path) -> None:
        try:
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("split") == "train"]
        except (OSError, csv.Error):
            return
        if rows:
            last = rows[-1]
            try:
                job.step = int(last["step"])
                job.loss = float(last["loss"]) if last.get("loss") else None
            except (KeyError, ValueError):
                return
            job.phase_done = job.step / max(1, job.steps)
