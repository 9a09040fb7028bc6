"""Teacher-student distillation of the image encoder: ``medsam train`` with ``train.mode: distill``.

This is how LiteMedSAM was made from MedSAM. The student's image encoder learns to reproduce the
teacher's image embeddings of the corpus's training slices, by mean squared error. Each model sees
a slice through its own preprocessing contract (e.g. MedSAM's 1024 px for a ViT-B teacher,
LiteMedSAM's 256 px for a TinyViT student). The teacher's embeddings are computed once, into an
embedding store (:mod:`medsam.train.embedding_store`), at ``distill.cache`` or else
``output.dir/teacher_embeddings``. The two embeddings must have the same shape.

The student's prompt encoder and mask decoder start as copies of the teacher's, so the exported
student segments at once, and its image encoder inherits every tensor of the teacher's with the
same name and shape (the SAM-style neck after its first convolution, for a ViT or TinyViT teacher
and a TinyViT student), so it starts at the teacher's output scale. A second run fine-tunes it
end to end, as LiteMedSAM's second stage did: ``train.mode: full`` with ``model.checkpoint`` set
to the export.

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
from torch import nn

from ..model.sam import MedSAMModel
from .config import TrainConfig
from .result import TrainResult

if TYPE_CHECKING:
    from ..corpus import ManifestRow
    from ..preprocess import Contract
    from .embedding_store import EmbeddingStore

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


def copy_matching(source: nn.Module, target: nn.Module) -> int:
    """Copy into ``target`` every tensor of ``source``'s state dict with the same name and shape;
    returns how many."""
    theirs = source.state_dict()
    ours = target.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    target.load_state_dict({**ours, **shared})
    return len(shared)


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
    from .embedding_store import EmbeddingStore, build_embedding_store, whole_key
    from .step_run import StepRun
    from .trainable import build_initial_model

    t, d = cfg.train, cfg.data
    if not d.corpus:
        raise ValueError("data.corpus is required (set it in the YAML or pass data.corpus=PATH)")
    run = StepRun(cfg, KIND)
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
    # equal embeddings make equal prompt encoders and decoders: the student takes the teacher's;
    # its encoder inherits the tensors the two share (a ViT or TinyViT's SAM-style neck)
    shared = copy_matching(teacher.prompt_encoder, student.prompt_encoder)
    shared += copy_matching(teacher.mask_decoder, student.mask_decoder)
    inherited = copy_matching(teacher.image_encoder, student.image_encoder)
    train_rows = _one_per_slice(read_manifest(d.corpus, d.train_split, d.datasets, d.modalities))
    val_rows = _one_per_slice(read_manifest(d.corpus, d.val_split, d.datasets, d.modalities)) if d.val_split else []
    val_rows = val_rows[: d.val_max_samples] if d.val_max_samples else val_rows
    if not train_rows:
        raise ValueError(f"no rows of split {d.train_split!r} in {d.corpus}")
    cache = Path(cfg.distill.cache) if cfg.distill.cache else run.run_dir / "teacher_embeddings"
    build_embedding_store(teacher, corpus, train_rows + val_rows, teacher_contract, cache, None, log=log.info)
    store = EmbeddingStore(cache)

    for p in student.parameters():
        p.requires_grad_(False)
    encoder = student.image_encoder
    for p in encoder.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
    per_epoch = max(1, len(train_rows) // d.batch_size)
    run.start(student, optimizer, t.max_steps or t.epochs * per_epoch, per_epoch)
    assert run.runlog is not None
    if run.resume_from is None:
        before = embedding_error(student.eval(), corpus, val_rows, contract, store)
        if before is not None:
            run.runlog.write(0, 0.0, "val", rel_err=before)
    log.info(
        "distilling %d slices into the student (%d prompt-encoder and decoder tensors taken, %d encoder tensors)",
        len(train_rows),
        shared,
        inherited,
    )
    encoder.train()
    loss = torch.zeros(())
    while run.step < run.steps:
        rng = np.random.default_rng((t.seed, run.step))
        batch = [train_rows[int(i)] for i in rng.integers(len(train_rows), size=d.batch_size)]
        inputs = torch.cat([prepare_image_fast(contract, load_slice(corpus, row)[0])[0] for row in batch])
        targets = torch.stack([store[whole_key(row)] for row in batch])
        loss = F.mse_loss(encoder(inputs), targets)
        run.update(loss, list(encoder.parameters()))
    after = embedding_error(student.eval(), corpus, val_rows, contract, store)
    if after is not None:
        run.runlog.write(run.step, run.epoch, "val", rel_err=after)
    metrics = {"val_rel_err": after, "loss": float(loss.detach())}
    return run.finish(student, extra={"distilled_from": str(cfg.distill.teacher)}, metrics=metrics)
