"""The bookkeeping of the trainers outside the main loop (SAM-Med3D fine-tuning, SAM2-family
clips, encoder distillation).

:class:`StepRun` covers what those runs share with the main loop's rules. A fresh run refuses a
folder that already holds one, and ``train.resume=auto`` continues from ``latest.pt``, which
holds the model, the optimiser and the step. The learning rate follows
:func:`medsam.train.schedule.lr_factor`. Rows go to ``metrics.csv`` every ``train.log_every``
steps. ``latest.pt`` is written every ``train.save_every`` steps and at the last one, and
``model.safetensors`` at the end. Each trainer draws its samples from a generator keyed by
(seed, step), so a resumed run sees the samples the uninterrupted one would.

Under torchrun (a trainer that passes its :class:`~.distributed.DistInfo`), every rank draws its
own sample (the generator keyed by (seed, step, rank)), the gradients are averaged over the
ranks before each optimiser step (so every rank keeps the same weights), the logged loss is
the ranks' mean, and only rank 0 writes files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from .config import TrainConfig, dump_config
from .distributed import DistInfo, all_reduce_mean, barrier
from .result import TrainResult
from .schedule import lr_factor

if TYPE_CHECKING:
    from .runlog import RunLog

log = logging.getLogger("medsam.train")


class LabelledCase(Protocol):
    values: list[int]  # the label values of the case that are trained on


CaseT = TypeVar("CaseT", bound=LabelledCase)


class StepRun:
    """One run's folder, position and log. Make it first (a fresh run into a used folder fails
    before any work), then :meth:`start` with the model and optimiser, :meth:`update` once per
    step, :meth:`finish` at the end."""

    def __init__(self, cfg: TrainConfig, kind: str, info: DistInfo | None = None) -> None:
        from .checkpoint import resolve_resume

        self.cfg = cfg
        self.kind = kind
        self.info = info or DistInfo()
        self.run_dir = Path(cfg.output.dir)
        self.resume_from = resolve_resume(cfg.train.resume, self.run_dir)
        if cfg.train.deterministic:  # e.g. TinyViT's attention-bias gather: its backward sums in any order
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.step = 0
        self.steps = 0
        self.per_epoch = 1
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.base_lr: list[float] = []
        self.runlog: RunLog | None = None

    def start(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, per_epoch: int, device: str = "cpu"
    ) -> None:
        """Restore ``latest.pt`` when resuming, write ``config.yaml`` and open the log."""
        from .checkpoint import load_checkpoint
        from .runlog import RunLog

        self.model, self.optimizer = model, optimizer
        self.steps, self.per_epoch = steps, max(1, per_epoch)
        self.base_lr = [float(group["lr"]) for group in optimizer.param_groups]
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, map_location=device)
            if state.get("kind") != self.kind:
                raise ValueError(f"{self.resume_from} is not a checkpoint of a {self.kind} run")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
        barrier(self.info)  # every rank has checked the folder before rank 0 writes into it
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
            resume_step = self.step if self.resume_from is not None else None
            self.runlog = RunLog(self.run_dir, resume_step=resume_step, tensorboard=self.cfg.output.tensorboard)

    def draw(self, cases: Sequence[CaseT]) -> tuple[np.random.Generator, CaseT, int]:
        """This step's generator (keyed by (seed, step), and the rank under torchrun), a case
        drawn from ``cases`` and one of the case's label ``values`` drawn with it."""
        key = (self.cfg.train.seed, self.step) + ((self.info.rank,) if self.info.distributed else ())
        rng = np.random.default_rng(key)
        case = cases[int(rng.integers(len(cases)))]
        return rng, case, case.values[int(rng.integers(len(case.values)))]

    @property
    def epoch(self) -> float:
        return self.step / self.per_epoch

    def update(self, loss: torch.Tensor, parameters: list[nn.Parameter], note: str = "") -> None:
        """One optimiser step on ``loss``: the scheduled learning rate, gradient clipping, the
        log row and ``latest.pt`` when due."""
        assert self.optimizer is not None, "start() first"
        t = self.cfg.train
        factor = lr_factor(self.step, t.warmup_steps, self.steps, t.min_lr_ratio)
        for group, lr in zip(self.optimizer.param_groups, self.base_lr, strict=True):
            group["lr"] = lr * factor
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.info.distributed:
            self._average_gradients(parameters)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, t.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.step % t.log_every == 0 or self.step == self.steps:
            value = float(all_reduce_mean(loss.detach(), self.info))
            if self.runlog is not None:
                self.runlog.write(self.step, self.epoch, "train", loss=value, lr=self.base_lr[0] * factor)
                log.info("step %d/%d loss %.5f%s", self.step, self.steps, value, f" ({note})" if note else "")
        if self.info.is_main and ((t.save_every and self.step % t.save_every == 0) or self.step == self.steps):
            self.save()

    def _average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Each gradient replaced by its mean over the ranks (a parameter without one on this
        rank counts as zero there), in one flat all-reduce."""
        from .distributed import all_reduce_mean

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]), self.info)
        offset = 0
        for p in parameters:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def save(self) -> None:
        from .checkpoint import FORMAT, VERSION, save_checkpoint

        assert self.model is not None and self.optimizer is not None, "start() first"
        state: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": self.kind, "step": self.step}
        state.update(config=self.cfg.to_dict(), model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        save_checkpoint(state, self.run_dir / "latest.pt")

    def finish(self, export: Any, extra: dict[str, Any], metrics: dict[str, Any] | None = None) -> TrainResult:
        """Close the log, write ``model.safetensors`` of ``export`` and describe the run."""
        from ..weights import save_model

        if self.runlog is not None:
            self.runlog.close()
        if self.info.is_main:
            save_model(export, self.run_dir / "model.safetensors", extra=extra)
        barrier(self.info)  # the other ranks return once the file is there
        return TrainResult(
            global_step=self.step,
            epoch=self.step // self.per_epoch,
            best_dsc=None,
            metrics=metrics,
            run_dir=self.run_dir,
        )
