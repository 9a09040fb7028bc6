"""Human in the loop: fine-tune the served model on the accepted labels, in the background.

One job (``POST /train``) does, in this order, and changes nothing the user sees until the end:

1. **Corpus.** The accepted labels become a corpus (:mod:`medsam.server.accepted_corpus`: one
   case per image with a labelled pixel, the slices exactly as the model sees them).
2. **Split** by image, by a hash of the image id (:func:`~medsam.server.accepted_corpus.split_images`):
   held-out images are scored, never trained on; fewer than :data:`MIN_ACCEPTED_IMAGES` accepted
   images are refused (422).
3. **Before.** The served model is scored on the held-out labels (:func:`score_heldout`).
4. **Training**: the library's training loop in a child process
   (:mod:`medsam.server.training_process`, :mod:`medsam.train.worker`), from the served
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

The job is driven by a thread of the server (it waits for the child, follows its progress, and
scores, which needs the served model object); why the training itself is a child process is said
in :mod:`medsam.server.training_process`.

Embeddings: the embedding cache is keyed by the image encoder's fingerprint and precision
(:func:`medsam.embedding_cache.embedding_id`), so a decoder-only model shares every
cached embedding with its base (the "after" scoring and the first prompts after the switch cost
no encoder call), and a LoRA model, whose encoder changed, never sees one of them.

Scores (:func:`score_heldout`): per object (one label on one held-out slice), by the evaluation
engine that ``medsam benchmark`` uses (:mod:`medsam.scoring`): the box prompt is the label's
bounding box on that slice, the mask comes from :class:`medsam.predictor.Predictor` on the
slice, DSC and NSD at 2 mm with the slice's pixel spacing; the summary is the mean over objects.
At most :data:`MAX_SCORED_SLICES` held-out slices are scored (evenly spaced), the same ones for
both models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..io.atomic import write_json
from .accepted_corpus import (
    HELDOUT_SPLIT,
    HOLDOUT_FRACTION,
    HOLDOUT_RULE,
    MIN_ACCEPTED_IMAGES,
    CorpusInfo,
    JobCancelled,
    write_accepted_corpus,
)
from .jobs import JobFailed, JobListing
from .labels import LabelStore, now_iso
from .served_models import ServedModels, TrainingRefused
from .shared_training import SharedTraining, TrainingSnapshot
from .trained_models import STARTUP_MODEL_ID
from .training_process import run_training_process, training_config

__all__ = [
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "MIN_ACCEPTED_IMAGES",
    "STARTUP_MODEL_ID",
    "TrainingJob",
    "TrainingManager",
    "TrainingRefused",
    "restore_encoder",
    "score_heldout",
    "summarize_scores",
]

DEFAULT_STEPS = 20
MAX_STEPS = 2000
DEFAULT_LR = 1e-4
MAX_LR = 1e-2
MAX_SCORED_SLICES = 64
NSD_TOLERANCE_MM = 2.0
_LOG_LINES = 200
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


# ----------------------------------------------------------------------------- scores
def score_heldout(
    model,
    corpus: Path,
    cache=None,
    cancelled: Callable[[], bool] = lambda: False,
    max_slices: int = MAX_SCORED_SLICES,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """DSC and NSD of ``model`` on every object of the corpus's held-out split, by the evaluation
    engine (:func:`medsam.scoring.score_objects`: the benchmark's prompts, metrics and loop; at
    most ``max_slices`` slices, evenly spaced).

    Returns one dict per object: ``case``, ``slice``, ``label``, ``label_name``, ``dsc``, ``nsd``.
    ``cache``: an :class:`~medsam.embedding_cache.EmbeddingCache` for the slice embeddings.
    """
    from ..corpus import read_manifest
    from ..scoring import PredictorMethod, score_objects

    method = PredictorMethod(model, cache=cache)
    try:
        scored = score_objects(
            corpus,
            read_manifest(corpus, HELDOUT_SPLIT),
            method,
            tolerance_mm=NSD_TOLERANCE_MM,
            max_slices=max_slices,
            cancelled=cancelled,
            progress=progress,
        )
    except InterruptedError:
        raise JobCancelled() from None
    finally:
        method.finish()
    keys = ("case", "slice", "label", "label_name", "dsc", "nsd")
    return [{k: o[k] for k in keys} for o in scored.objects]


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
    """Mean DSC and NSD over objects (:func:`medsam.scoring.mean_scores`) and the NSD tolerance."""
    from ..scoring import mean_scores

    return {**mean_scores(rows), "nsd_tolerance_mm": NSD_TOLERANCE_MM}


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


class TrainingManager(ServedModels, JobListing[TrainingJob]):
    """Training jobs (one at a time) and the models they made (module docstring).

    Args:
        settings: the server settings (``DATA/.medsam/models`` holds the models).
        datastore, labels, engine: the workbench's (the engine serves the model).
        threads: CPU threads of the training process (default: half the cores, at least 1).
        python: interpreter that runs ``medsam train`` (default: this one).
    """

    def __init__(
        self,
        settings,
        datastore,
        labels: LabelStore,
        engine,
        threads: int | None = None,
        python: str | None = None,
        shared: SharedTraining | None = None,
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
        self.shared = shared
        self._switching = threading.Lock()

    # ------------------------------------------------------------------ jobs
    def active_job(self) -> TrainingJob | TrainingSnapshot | None:
        """This process's active job, else another process's (from the state database)."""
        with self._lock:
            local = next((j for j in self._jobs.values() if j.active), None)
        if local is None and self.shared is not None:
            return self.shared.active()
        return local

    def get(self, job_id: str) -> TrainingJob | TrainingSnapshot | None:  # type: ignore[override]
        local = self._jobs.get(job_id)
        if local is None and self.shared is not None:
            return self.shared.get(job_id)
        return local

    def all(self) -> list[TrainingJob | TrainingSnapshot]:  # type: ignore[override]
        """Every kept job of every process, oldest first."""
        with self._lock:
            local = list(self._jobs.values())
        if self.shared is None:
            return list(local)
        ids = {j.id for j in local}
        others = [j for j in self.shared.all() if j.id not in ids]
        return sorted([*local, *others], key=lambda j: (j.info()["created"], j.id))

    def cancel(self, job_id: str) -> TrainingJob | TrainingSnapshot | None:  # type: ignore[override]
        """Cancel a job of this process at once, or request it of the process running it."""
        if job_id in self._jobs or self.shared is None:
            return super().cancel(job_id)
        self.shared.request_cancel(job_id)
        return self.shared.get(job_id)

    def start(self, mode: str, steps: int, lr: float) -> TrainingJob:
        """Check the request and start a job in a background thread; raises TrainingRefused."""
        if mode not in ("decoder", "lora"):
            raise TrainingRefused("mode must be 'decoder' or 'lora'", 422)
        from ..model.sam2 import SAM2Model

        if isinstance(self.engine.model, SAM2Model):
            raise TrainingRefused(
                f"the served model ({self.engine.model.config.name}) is SAM2-family: fine-tuning takes SAM, "
                "MedSAM and LiteMedSAM models",
                422,
            )
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
            other = self.shared.claim(job.id, job.created, job.info()) if self.shared is not None else None
            if other is not None:
                raise TrainingRefused(f"a training job is running ({other}); wait for it or cancel it", 409)
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

    def _cancelled(self, job: TrainingJob) -> None:
        proc = self._procs.get(job.id)
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def shutdown(self, timeout: float = 20.0) -> None:
        """Cancel a running job and wait for its thread (the served model stays as it is)."""
        for job in list(self._jobs.values()):  # this process's jobs only
            if job.active:
                self.cancel(job.id)
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def accepted_images(self) -> list[str]:
        """Ids of images with a saved label version."""
        return [i for i in self.datastore.list_ids() if self.labels.status(i)[0] == "labelled"]

    # ------------------------------------------------------------------ the work
    def _run(self, job: TrainingJob, accepted: list[str]) -> None:
        """:meth:`_run_job`, its status published to the state database every half second (and
        a cancel request made through another process honoured) while it runs, and at its end."""
        shared = self.shared
        if shared is None:
            self._run_job(job, accepted)
            return
        stop = threading.Event()

        def publish() -> None:
            while not stop.wait(0.5):
                if shared.publish(job.id, job.state, job.info()) and job.active and not job.cancelled:
                    self.cancel(job.id)

        publisher = threading.Thread(target=publish, name=f"medsam-train-status-{job.id}", daemon=True)
        publisher.start()
        try:
            self._run_job(job, accepted)
        finally:
            stop.set()
            publisher.join()
            shared.publish(job.id, job.state, job.info())

    def _run_job(self, job: TrainingJob, accepted: list[str]) -> None:
        job.state = "running"
        job_dir = self.models_dir / job.id
        try:
            self._work(job, accepted, job_dir)
            job.state = "done"
        except JobCancelled:
            job.state = "cancelled"
            job.say("cancelled; the served model is unchanged")
        except JobFailed as exc:
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
            raise JobCancelled()

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
            raise JobFailed("no object to train on or to score", 422)

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
        config_path = training_config(job.mode, job.steps, job.lr, corpus, base_path, run_dir, base_model.device)

        def on_metrics(step: int, loss: float | None) -> None:
            job.step, job.loss = step, loss
            job.phase_done = step / max(1, job.steps)

        def on_start(proc) -> None:
            self._procs[job.id] = proc
            job.say(f"training process {proc.pid}: medsam.train.worker {config_path.name} ({self.threads} threads)")

        run_training_process(
            config_path,
            job_dir,
            run_dir,
            threads=self.threads,
            python=self.python,
            on_start=on_start,
            cancelled=cancelled,
            on_log=lambda line: job.log.append(f"[train] {line}"),
            on_metrics=on_metrics,
        )

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
            "split": {"method": HOLDOUT_RULE, "fraction": HOLDOUT_FRACTION},
            "train_images": job.train_images,
            "heldout_images": job.heldout_images,
            "train_objects": job.train_objects,
            "heldout_objects": job.heldout_objects,
            "before": job.before,
            "after": job.after,
            "objects": job.objects,
        }
        write_json(job_dir / "training.json", record)
        with self._lock:
            if job.cancelled:
                raise JobCancelled()
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
