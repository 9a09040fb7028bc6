"""The training loop: one process or many (torchrun + DDP), exactly resumable.

    from medsam.train import load_config, train
    result = train(load_config("configs/tiny_cpu.yaml", ["data.corpus=/data/corpus"]))

Steps and epochs
----------------
A *step* is one optimiser step over a global batch of ``G = batch_size x world_size x accumulation``
samples. An epoch has ``floor(samples per rank / (batch_size x accumulation))`` steps (an incomplete
last step is dropped on every rank alike). Step ``s`` of epoch ``e`` uses the samples
``perm_e[s G : (s + 1) G]`` of the epoch's seeded permutation, whatever the number of processes.

Resume
------
``latest.pt`` is written (atomically) every ``save_every`` steps, at each epoch end and at the
last step, after the optimiser step, the scheduler step and the position update, so it always
describes a step boundary: (epoch, step_in_epoch, global_step). A resumed run restores model,
optimiser, scheduler, scaler and RNG states and restarts the sampler of that epoch skipping
``step_in_epoch x batch_size x accumulation`` samples of each rank: exactly the samples already
used, no more, no less. Every random choice of a sample is keyed by (seed, epoch, index), so the
remaining samples are the very ones the uninterrupted run would have seen, and the weights at the
end equal those of an uninterrupted run (up to floating-point non-determinism of the hardware).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..clicks import add_error_clicks
from ..corpus import read_manifest
from ..corpus.shards import is_sharded, shard_rows
from ..preprocess import get_contract
from ..scribbles import DEFAULT_MAX_POINTS as SCRIBBLE_POINTS
from .checkpoint import FORMAT, VERSION, load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, dump_config, trains_clips
from .data import (
    AugmentOptions,
    EpochSampler,
    PromptOptions,
    SegmentationDataset,
    ValidationSlices,
    clicks_for_step,
    collate,
    steps_per_epoch,
)
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, cleanup, init_distributed
from .losses import SegmentationLoss
from .result import TrainResult as TrainResult
from .runlog import RunLog
from .schedule import lr_factor as lr_factor
from .trainable import SegmentationStep, build_initial_model, configure_trainable, enable_gradient_checkpointing
from .validate import validate

if TYPE_CHECKING:
    from ..cluster import DaskEngine

log = logging.getLogger("medsam.train")


class Trainer:
    """Owns the model, data, optimiser and position of one run (one process of it)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None, store_engine: DaskEngine | None = None) -> None:
        """``store_engine``: where the parts of ``data.cache_embeddings`` are computed when the
        store must be built (default: in this process, by rank 0)."""
        self.cfg = cfg
        # Without ``info``, read torchrun's variables (if any) and pick ``train.device`` here.
        self.info = info or init_distributed(cfg.train.device)
        self.device = self.info.device
        t, d = cfg.train, cfg.data
        self.run_dir = Path(cfg.output.dir)
        if t.deterministic:
            # cuBLAS needs this workspace setting for reproducible GEMMs; it is read when the
            # first handle is made, which has not happened yet.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if t.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("train.precision fp16 needs CUDA; use bf16 on CPU")
        if not d.corpus:
            raise ValueError("data.corpus is required (set it in the YAML or pass data.corpus=PATH)")

        # ---------------------------------------------------------------- model
        model = build_initial_model(cfg.model, t.seed)
        self.trainable = configure_trainable(model, t.mode, cfg.lora, cfg.adapter)
        if t.grad_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model.to(self.device).train()
        self.contract = get_contract(model.contract, model.input_size)
        step = SegmentationStep(self.model, frozen_encoder=t.mode == "decoder")
        self.step = step
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Some parameters never enter the graph (e.g. the key bias of token-to-image attention,
            # which softmax ignores and the decoder skips): let DDP find them on every step. They
            # keep grad None, so AdamW leaves them alone, exactly as in a single process.
            self.step_module = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)
        else:
            self.step_module = step

        # ----------------------------------------------------------------- data
        rows = read_manifest(d.corpus, d.train_split, d.datasets, d.modalities)
        if not rows:
            raise ValueError(f"no rows of split {d.train_split!r} in {d.corpus}/manifest.csv")
        # A shard folder on several ranks: each rank reads the rows of its own shards only.
        rank_shards, pad_to = is_sharded(d.corpus) and self.info.world_size > 1, None
        if rank_shards:
            if d.cache_embeddings:
                raise ValueError("data.cache_embeddings with a shard folder on several ranks is not supported")
            rows, pad_to = shard_rows(d.corpus, rows, self.info.rank, self.info.world_size)
            if not rows:
                raise ValueError(
                    f"rank {self.info.rank} has no shard: use at most as many ranks as {d.corpus} has shards"
                )
        store, store_zoom, store_lesions = None, None, None
        if d.cache_embeddings:
            from ..zoom import ZoomPolicy
            from .embedding_store import EmbeddingStore, build_embedding_store

            if d.augment.zoom_prob > 0:
                lo, hi = (float(v) for v in d.augment.zoom_context)
                store_zoom = ZoomPolicy(context=(lo + hi) / 2.0, min_side=d.augment.zoom_min_side)
            if d.augment.lesion_prob > 0:
                store_lesions = d.augment.lesion_views(d.augment.lesion_variants, t.seed)
            if self.info.is_main:
                build_embedding_store(
                    self.model,
                    d.corpus,
                    rows,
                    self.contract,
                    d.cache_embeddings,
                    store_zoom,
                    log=log.info,
                    engine=store_engine,
                    lesions=store_lesions,
                )
            barrier(self.info)
            store = EmbeddingStore(d.cache_embeddings)
        self.train_set = SegmentationDataset(
            d.corpus,
            rows,
            self.contract,
            model.prompt_encoder.mask_input_size[0],
            prompts=PromptOptions(
                d.box,
                d.jitter,
                d.jitter_mode,
                d.jitter_fraction,
                d.points,
                d.negative_points,
                d.mask_prompt_prob,
                d.mask_prompt_logit,
                d.clicks if d.click_source == "random" else 0,
            ),
            augment=AugmentOptions(
                d.augment.flip_prob,
                tuple(d.augment.gamma) if d.augment.gamma else None,
                tuple(d.augment.contrast) if d.augment.contrast else None,
                d.augment.zoom_prob,
                tuple(float(v) for v in d.augment.zoom_context),
                d.augment.zoom_min_side,
                d.augment.lesion_prob,
                tuple(str(k) for k in d.augment.lesion_kinds),
                d.augment.lesion_weights_tuple(),
            ),
            train=True,
            seed=t.seed + (1_000_003 * self.info.rank if rank_shards else 0),  # ranks' draws differ
            store=store,
            store_zoom=store_zoom,
            store_lesions=store_lesions,
        )
        if rank_shards:
            self.sampler = EpochSampler(len(self.train_set), seed=t.seed + self.info.rank, pad_to=pad_to)
        else:
            self.sampler = EpochSampler(len(self.train_set), self.info.world_size, self.info.rank, seed=t.seed)
        self.steps_per_epoch = steps_per_epoch(self.sampler.samples_per_epoch, d.batch_size, t.accumulation)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(rows)} training samples are fewer than one global batch "
                f"({d.batch_size} x {self.info.world_size} ranks x {t.accumulation} accumulation)"
            )
        self.global_batch = d.batch_size * self.info.world_size * t.accumulation
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        self.val_slices = None
        if d.val_split:  # every rank scores its part of the slices (validate gathers the scores)
            val_rows = read_manifest(d.corpus, d.val_split, d.datasets, d.modalities)
            if d.val_max_samples:
                val_rows = val_rows[: d.val_max_samples]
            if val_rows:
                part = (self.info.rank, self.info.world_size)
                val_lesions = d.augment.lesion_views(d.val_lesions, t.seed) if d.val_lesions else None
                self.val_slices = ValidationSlices(
                    d.corpus, val_rows, self.contract, part, lesions=val_lesions, pixels=d.val_zoom
                )
            elif self.info.is_main:
                log.warning("no rows of split %r: no validation, no best.pt", d.val_split)

        # ------------------------------------------------------------ optimiser
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        warmup, total, floor = t.warmup_steps, self.total_steps, t.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total, floor))
        self.scaler = _grad_scaler(self.device.type, enabled=t.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.loss_fn = SegmentationLoss.from_config(cfg.loss)

        # -------------------------------------------------------------- position
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_dsc: float | None = None
        self.last_metrics: dict | None = None
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_config": self.model.config.to_dict(),
            "contract": self.model.contract,
            "mode": self.cfg.train.mode,
            "lora": self.cfg.to_dict()["lora"] if self.cfg.train.mode == "lora" else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch": self.global_batch,
            "world_size": self.info.world_size,
            "best_dsc": self.best_dsc,
            "metrics": self.last_metrics,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.cfg.train.mode:
            raise ValueError(f"checkpoint was trained with mode {state['mode']!r}, config says {self.cfg.train.mode!r}")
        if state["global_batch"] != self.global_batch or state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"cannot resume exactly: the checkpoint's global batch is {state['global_batch']} with "
                f"{state['steps_per_epoch']} steps per epoch, this run's is {self.global_batch} with "
                f"{self.steps_per_epoch}; keep batch_size x processes x accumulation (and the data) the same"
            )
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.best_dsc = state.get("best_dsc")
        self.last_metrics = state.get("metrics")
        if state["world_size"] != self.info.world_size:
            log.info(
                "resuming a %d-process run on %d processes (same global batch)",
                state["world_size"],
                self.info.world_size,
            )

    def maybe_resume(self) -> None:
        """Decide on rank 0 whether and from where to resume, then load the checkpoint on every rank."""
        errors = {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError}
        decision: tuple[str | None, str | None, str] = (None, None, "")
        if self.info.is_main:
            try:
                path = resolve_resume(self.cfg.train.resume, self.run_dir)
                decision = (str(path) if path else None, None, "")
            except (FileNotFoundError, FileExistsError) as exc:
                decision = (None, type(exc).__name__, str(exc))
        path, error, message = broadcast_object(decision, self.info)
        if error:
            raise errors[error](message)
        if path:
            state = load_checkpoint(path)
            _warn_config_changes(state.get("config", {}), self.cfg.to_dict())
            self.load_state_dict(state)
            self.resumed_from = Path(path)
            if self.info.is_main:
                log.info(
                    "resumed from %s at step %d (epoch %d, step %d of it)",
                    path,
                    self.global_step,
                    self.epoch,
                    self.step_in_epoch,
                )

    def save(self, name: str) -> Path | None:
        if not self.info.is_main:
            return None
        return save_checkpoint(self.state_dict(), self.run_dir / name)

    # -------------------------------------------------------------- training
    def _inputs(self, batch: dict) -> tuple[dict, int]:
        """The step module's inputs for ``batch`` and the number of corrective click points
        appended at the end of its points (0 on a step without clicks; k corrections times
        :meth:`_round_width`)."""
        dev = self.device
        nb = dev.type == "cuda"
        get = lambda k: batch[k].to(dev, non_blocking=nb) if k in batch else None
        points, point_labels = get("points"), get("point_labels")
        d = self.cfg.data
        k = clicks_for_step(self.cfg.train.seed, self.global_step, d.clicks, d.click_prob)
        n_clicks = 0
        if k and "clicks" in batch:
            n_clicks = k
            clicks, click_labels = get("clicks")[:, :k], get("click_labels")[:, :k]
            points = clicks if points is None else torch.cat([points, clicks], dim=1)
            point_labels = click_labels if point_labels is None else torch.cat([point_labels, click_labels], dim=1)
        inputs = {
            "images": get("image"),
            "embeddings": get("embedding"),
            "boxes": get("box"),
            "points": points,
            "point_labels": point_labels,
            "mask_input": get("mask_input"),
            "has_mask": get("has_mask"),
        }
        if k and d.click_source in ("errors", "scribbles"):
            # The gradient-free rounds go through the unwrapped step (no DDP buffer syncs) on
            # embeddings computed once (an encoder that is trained reruns only in the final pass;
            # in train mode that extra pass also moves BatchNorm statistics, as any forward does).
            probe = dict(inputs)
            if probe["embeddings"] is None:
                with torch.no_grad():
                    probe["embeddings"] = self.step.model.image_encoder(probe["images"])
                probe["images"] = None
            if d.click_source == "scribbles":
                clicked = add_error_clicks(self.step, probe, get("target"), k, strokes=True)
            else:
                clicked = add_error_clicks(self.step, probe, get("target"), k)
            inputs["points"], inputs["point_labels"] = clicked["points"], clicked["point_labels"]
            n_clicks = k * self._round_width()
        return inputs, n_clicks

    def _round_width(self) -> int:
        """Points one correction adds: 1 per click, a stroke's padded point count for scribbles."""
        return SCRIBBLE_POINTS if self.cfg.data.click_source == "scribbles" else 1

    def _rounds(self, inputs: dict, n_clicks: int) -> list[dict]:
        """The prompt sets a step is trained on: ``inputs`` alone, or with ``data.click_loss:
        every`` and clicks, the box with the first 0, 1, ..., k corrections."""
        if not n_clicks or self.cfg.data.click_loss != "every":
            return [inputs]
        rounds = []
        n_points = inputs["points"].shape[1]
        width = self._round_width()
        for j in range(n_clicks // width + 1):
            keep = n_points - n_clicks + j * width
            r = dict(inputs)
            r["points"] = inputs["points"][:, :keep] if keep else None
            r["point_labels"] = inputs["point_labels"][:, :keep] if keep else None
            rounds.append(r)
        return rounds

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def micro_step(self, batch: dict, sync: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; gradients are all-reduced only when ``sync``."""
        accum = self.cfg.train.accumulation
        rounds = self._rounds(*self._inputs(batch))
        target = batch["target"].to(self.device)
        total, terms = None, {}
        for i, inputs in enumerate(rounds):
            # gradients of several rounds are all-reduced once, with the last backward
            no_sync = self.info.distributed and (not sync or i < len(rounds) - 1)
            ctx = self.step_module.no_sync() if no_sync else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    logits, iou = self.step_module(**inputs)
                out = self.loss_fn(logits, iou, target)
                self.scaler.scale(out.total / (accum * len(rounds))).backward()
            total = out.total.detach() if total is None else total + out.total.detach()
            for name, value in out.terms.items():
                terms[name] = value if name not in terms else terms[name] + value
        n = len(rounds)
        return {"loss": total / n, **{name: value / n for name, value in terms.items()}}

    def optimizer_step(self) -> None:
        t = self.cfg.train
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def fit(self) -> TrainResult:
        cfg, t, d = self.cfg, self.cfg.train, self.cfg.data
        self.maybe_resume()
        runlog = None
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            runlog = RunLog(self.run_dir, self.global_step if self.resumed_from else None, cfg.output.tensorboard)
        bar = None
        if self.info.is_main and t.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)

        loader = DataLoader(
            self.train_set,
            batch_size=d.batch_size,
            sampler=self.sampler,
            num_workers=d.workers,
            collate_fn=collate,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
        )
        per_step = d.batch_size * t.accumulation
        sums: dict[str, torch.Tensor] = {}
        micro_count = 0
        tick = time.perf_counter()
        steps_since_log = 0
        try:
            while self.global_step < self.total_steps:
                self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * per_step)
                micro = 0
                for batch in loader:
                    micro += 1
                    terms = self.micro_step(batch, sync=micro % t.accumulation == 0)
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v.float()
                    micro_count += 1
                    if micro % t.accumulation:
                        continue
                    lr = float(self.optimizer.param_groups[0]["lr"])  # the LR of this step
                    self.optimizer_step()
                    self.global_step += 1
                    self.step_in_epoch += 1
                    steps_since_log += 1
                    epoch_done = self.step_in_epoch == self.steps_per_epoch
                    if epoch_done:
                        self.epoch += 1
                        self.step_in_epoch = 0
                    last = self.global_step >= self.total_steps
                    if bar is not None:
                        bar.update(1)
                    if self.global_step % t.log_every == 0 or epoch_done or last:
                        keys = sorted(sums)
                        means = all_reduce_mean(
                            torch.stack([sums[k] / micro_count for k in keys]).to(self.device), self.info
                        ).cpu()
                        elapsed = max(time.perf_counter() - tick, 1e-9)
                        throughput = steps_since_log * self.global_batch / elapsed
                        if runlog is not None:
                            values = dict(zip(keys, means.tolist()))
                            runlog.write(
                                self.global_step,
                                self.global_step / self.steps_per_epoch,
                                "train",
                                loss=values["loss"],
                                lr=lr,
                                throughput=throughput,
                            )
                            for k, v in values.items():
                                if k != "loss":
                                    runlog.scalar(f"train/{k}", v, self.global_step)
                            if bar is not None:
                                bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{throughput:.1f}")
                        sums, micro_count, steps_since_log = {}, 0, 0
                        tick = time.perf_counter()
                    # Throughput counts training time only: move the clock past validation/saving.
                    tick += self._checkpoint_and_validate(epoch_done, last, lr, runlog)
                    if epoch_done or last:
                        break
                else:  # the loader ran dry before the epoch's last step: never loop on silently
                    raise RuntimeError(
                        f"epoch {self.epoch} ended after step {self.step_in_epoch} of {self.steps_per_epoch}"
                    )
        finally:
            if bar is not None:
                bar.close()
            if runlog is not None:
                runlog.close()
        return TrainResult(self.global_step, self.epoch, self.best_dsc, self.last_metrics, self.run_dir)

    def _checkpoint_and_validate(self, epoch_done: bool, last: bool, lr: float, runlog: RunLog | None) -> float:
        """Validate when due (every rank its part of the slices), save (rank 0; the others wait).
        Returns the seconds spent."""
        start = time.perf_counter()
        t = self.cfg.train
        step = self.global_step
        want_val = self.cfg.data.val_split is not None and (
            (t.val_every > 0 and step % t.val_every == 0) or (t.val_every == 0 and epoch_done) or last
        )
        want_save = (t.save_every > 0 and step % t.save_every == 0) or epoch_done or last
        if not (want_val or want_save):
            return 0.0
        metrics = None
        if want_val and self.val_slices is not None:
            metrics = validate(
                self.model,
                self.val_slices,
                batch_size=self.cfg.data.batch_size,
                workers=self.cfg.data.workers,
                autocast_dtype=self.amp_dtype,
                info=self.info,
            )
            self.step.train()  # validate() restores model.train(): keep a frozen encoder in eval
        if self.info.is_main:
            if metrics is not None:
                self.last_metrics = metrics
                for modality, m in metrics.items():
                    runlog.write(step, step / self.steps_per_epoch, "val", modality, dsc=m["dsc"], nsd=m["nsd"], lr=lr)
                dsc = metrics["all"]["dsc"]
                log.info("step %d: validation DSC %.4f NSD %.4f", step, dsc, metrics["all"]["nsd"])
                if self.best_dsc is None or dsc > self.best_dsc:
                    self.best_dsc = dsc
                    self.save("best.pt")
            if want_save:
                self.save("latest.pt")
        barrier(self.info)
        return time.perf_counter() - start


def _grad_scaler(device_type: str, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in ("train.resume", "train.progress"):
            log.warning("config differs from the checkpoint's: %s%s = %r (was %r)", prefix, key, b, a)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; under torchrun, one call per process."""
    if cfg.model.arch == "sam_med3d":  # volumes and clicks, one process
        from .sam_med3d import train_sam_med3d

        return train_sam_med3d(cfg)
    if trains_clips(cfg):  # SAM2-family memory tracking on clips of volumes (torchrun or not)
        from .sam2_clips import train_sam2_clips

        return train_sam2_clips(cfg)
    if cfg.train.mode == "distill":  # encoder distillation, one process
        from .distill import train_distill

        return train_distill(cfg)
    info = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, info).fit()
    finally:
        cleanup(info)
