"""What a run reports (rank 0 only): ``metrics.csv`` and, if tensorboard is installed, scalars.

``metrics.csv`` columns: ``step, epoch, split, modality, loss, dsc, nsd, lr, throughput``.
Training rows (``split=train``, ``modality=all``) carry the mean loss of the optimiser steps since
the previous row (over all ranks), the learning rate and samples per second; validation rows
(``split=val``) one per modality plus ``all``, with DSC and NSD. ``epoch`` is fractional
(``global_step / steps_per_epoch``), so 1.0 is the end of the first epoch.

On resume, rows logged after the checkpoint's step (by the interrupted run) are removed first, so
the file reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

COLUMNS = ("step", "epoch", "split", "modality", "loss", "dsc", "nsd", "lr", "throughput", "rel_err")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class RunLog:
    """Appends rows to ``run_dir/metrics.csv`` and mirrors numbers to TensorBoard when available."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(
                    log_dir=str(Path(run_dir) / "tb"),
                    purge_step=resume_step + 1 if resume_step is not None else None,
                )

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, epoch: float, split: str, modality: str = "all", **values) -> None:
        row = {"step": step, "epoch": round(epoch, 4), "split": split, "modality": modality, **values}
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in COLUMNS])
        if self.writer is not None:
            for key in ("loss", "dsc", "nsd", "lr", "throughput", "rel_err"):
                if values.get(key) is not None:
                    self.writer.add_scalar(
                        f"{split}/{key}" + ("" if modality == "all" else f"/{modality}"), values[key], step
                    )

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
