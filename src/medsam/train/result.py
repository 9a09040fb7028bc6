"""What a finished (or resumed and finished) training run reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainResult:
    global_step: int
    epoch: int
    best_dsc: float | None
    metrics: dict | None
    run_dir: Path
