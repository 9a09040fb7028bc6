"""Teacher-student distillation of the image encoder: ``medsam train`` with ``train.mode: distill``.

This is how LiteMedSAM was made from MedSAM. The student's image encoder learns to reproduce the
teacher's image embeddings of the corpus's training slices, by mean squared error. Each model sees
a slice through its own preprocessing contract (e.g. MedSAM's 1024 px for a ViT-B teacher,
LiteMedSAM's 256 px for a TinyViT student). The teacher's embeddings are computed once, into an
embedding store (:mod:`medsam.train.embedding_store`), at ``distill.cache`` or else
``output.dir/teacher_embeddings``. The two embeddings must have the same shape.

The student's prompt encoder and mask decoder start as copies of the teacher's, so the exported
student segments at once. A second run fine-tunes it end to end, as LiteMedSAM's second stage
did: ``train.mode: full`` with ``model.checkpoint`` set to the export.

Each step draws ``data.batch_size`` slices with a generator keyed by (seed, step). ``latest.pt``
holds the student, the optimiser and the step, so a resumed run continues exactly. At the end,
``model.safetensors`` holds the student. ``metrics.csv`` records the training loss, and the relative
L2 error of the student's embeddings against the teacher's on the validation split, before and
after training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..model.sam import MedSAMModel
from .config import TrainConfig, dump_config

if TYPE_CHECKING:
    from ..corpus import ManifestRow
    from ..preprocess import Contract
    from .embedding_store import EmbeddingStore
    from .loop import TrainResult

log = logging.getLogger("medsam.train")

KIND = "distill"


def load_teacher(source: str | None) -> MedSAMModel:
    """The teacher: a checkpoint path or registry name; ``"default"`` is the embedded model."""
    from ..weights import load_model

    if not source:
        raise ValueError("train.mode distill needs distill.teacher: a checkpoint, a model name or 'default'")
    model = load_model(None if source == "default" else source, device="cpu")
    if not isinstance(model, MedSAMModel):
        raise ValueError(f"distill.teacher {source} is not a SAM / MedSAM / LiteMedSAM model")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def copy_prompt_parts(teacher: MedSAMModel, student: MedSAMModel) -> bool:
    """Give the student the teacher's prompt encoder and mask decoder where their shapes agree."""
    ours = {
        **student.prompt_encoder.state_dict(),
        **{f"d.{k}": v for k, v in student.mask_decoder.state_dict().items()},
    }
    theirs = {
        **teacher.prompt_encoder.state_dict(),
        **{f"d.{k}": v for k, v in teacher.mask_decoder.state_dict().items()},
    }
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        return False
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    return True


def embedding_error(
    student: MedSAMModel, corpus: Path, rows: Sequence[ManifestRow], contract: Contract, store: EmbeddingStore
) -> float | None:
    """Relative L2 error ``|s - t| / |t|`` of the student's embeddings over ``rows``' slices."""
    from ..corpus import load_slice
    from ..preprocess_fast import prepare_image_fast
    from .embedding_store import whole_key

    if not rows:
        return None
    num = den = 0.0
    with torch.no_grad():
        for row in rows:
            image, _, _ = load_slice(corpus, row)
            got = student.image_encoder(prepare_image_fast(contract, image)[0])[0]
            want = store[whole_key(row)]
            num += float((got - want).pow(2).sum())
            den += float(want.pow(2).sum())
    error: float = (num / max(den, 1e-12)) ** 0.5
    return error


def _one_per_slice(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    seen, out = set(), []
    for row in rows:
        if row.path not in seen:
            seen.add(row.path)
            out.append(row)
    return out


def train_distill(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) an encoder distillation as configured."""
    from ..corpus import load_slice, read_manifest
    from ..preprocess import get_contract
    from ..preprocess_fast import prepare_image_fast
    from ..weights import save_model
    from .checkpoint import FORMAT, VERSION, load_checkpoint, resolve_resume, save_checkpoint
    from .embedding_store import EmbeddingStore, build_embedding_store, whole_key
    from .loop import TrainResult, lr_factor
    from .runlog import RunLog
    from .trainable import build_initial_model

    t, d = cfg.train, cfg.data
    if not d.corpus:
        raise ValueError("data.corpus is required (set it in the YAML or pass data.corpus=PATH)")
    run_dir = Path(cfg.output.dir)
    resume = resolve_resume(t.resume, run_dir)
    corpus = Path(d.corpus)
    teacher = load_teacher(cfg.distill.teacher)
    student = build_initial_model(cfg.model, t.seed)
    teacher_contract = get_contract(cfg.distill.teacher_contract or teacher.contract, teacher.input_size)
    contract = get_contract(student.contract, student.input_size)
    with torch.no_grad():
        probe = np.zeros((8, 8), np.uint8)
        s_shape = student.image_encoder.eval()(prepare_image_fast(contract, probe)[0]).shape
        t_shape = teacher.embed_image(prepare_image_fast(teacher_contract, probe)[0]).shape
    if s_shape != t_shape:
        raise ValueError(f"the student's embeddings {tuple(s_shape)} and the teacher's {tuple(t_shape)} differ")
    shared = copy_prompt_parts(teacher, student)
    train_rows = _one_per_slice(read_manifest(d.corpus, d.train_split, d.datasets, d.modalities))
    val_rows = _one_per_slice(read_manifest(d.corpus, d.val_split, d.datasets, d.modalities)) if d.val_split else []
    val_rows = val_rows[: d.val_max_samples] if d.val_max_samples else val_rows
    if not train_rows:
        raise ValueError(f"no rows of split {d.train_split!r} in {d.corpus}")
    cache = Path(cfg.distill.cache) if cfg.distill.cache else run_dir / "teacher_embeddings"
    build_embedding_store(teacher, corpus, train_rows + val_rows, teacher_contract, cache, None, log=log.info)
    store = EmbeddingStore(cache)

    for p in student.parameters():
        p.requires_grad_(False)
    encoder = student.image_encoder.train()
    for p in encoder.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
    per_epoch = max(1, len(train_rows) // d.batch_size)
    steps = t.max_steps or t.epochs * per_epoch
    step = 0
    if resume is not None:
        state = load_checkpoint(resume)
        if state.get("kind") != KIND:
            raise ValueError(f"{resume} is not a distillation checkpoint")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    runlog = RunLog(run_dir, resume_step=step if resume is not None else None, tensorboard=cfg.output.tensorboard)
    if resume is None:
        before = embedding_error(student.eval(), corpus, val_rows, contract, store)
        if before is not None:
            runlog.write(0, 0.0, "val", rel_err=before)
        encoder.train()
    log.info("distilling %d slices into the student (prompt parts shared: %s)", len(train_rows), shared)

    def checkpoint() -> None:
        state = {"format": FORMAT, "version": VERSION, "kind": KIND, "step": step, "config": cfg.to_dict()}
        state.update(model=student.state_dict(), optimizer=optimizer.state_dict())
        save_checkpoint(state, run_dir / "latest.pt")

    loss = torch.zeros(())
    while step < steps:
        rng = np.random.default_rng((t.seed, step))
        batch = [train_rows[int(i)] for i in rng.integers(len(train_rows), size=d.batch_size)]
        inputs = torch.cat([prepare_image_fast(contract, load_slice(corpus, row)[0])[0] for row in batch])
        targets = torch.stack([store[whole_key(row)] for row in batch])
        loss = F.mse_loss(encoder(inputs), targets)
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(step, t.warmup_steps, steps, t.min_lr_ratio)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), t.grad_clip)
        optimizer.step()
        step += 1
        if step % t.log_every == 0 or step == steps:
            runlog.write(step, step / per_epoch, "train", loss=float(loss.detach()))
            log.info("step %d/%d embedding MSE %.5f", step, steps, float(loss.detach()))
        if (t.save_every and step % t.save_every == 0) or step == steps:
            checkpoint()
    after = embedding_error(student.eval(), corpus, val_rows, contract, store)
    if after is not None:
        runlog.write(step, step / per_epoch, "val", rel_err=after)
    runlog.close()
    save_model(student, run_dir / "model.safetensors", extra={"distilled_from": str(cfg.distill.teacher)})
    metrics = {"val_rel_err": after, "loss": float(loss.detach())}
    return TrainResult(global_step=step, epoch=step // per_epoch, best_dsc=None, metrics=metrics, run_dir=run_dir)
