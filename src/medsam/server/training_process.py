"""The training run of a workbench job as a child process: its config, the process, its progress.

The run is ``python -m medsam.train.worker CONFIG RESULT`` (:mod:`medsam.train.worker`: the
library's training loop with a structured result file), started with its own thread count and a
lower CPU priority, ending with the server (``MEDSAM_PARENT_PID``). Progress comes from the run's
``metrics.csv`` (step, loss), the log lines are passed on for the job's log tail, and the outcome
from ``RESULT`` (the error of a failed run is the exception the loop raised, not a log line).

Why a child process: ``torch.set_num_threads`` is process-wide, so a training thread could not be
limited to fewer cores without slowing the interactive model; the loop does not compete for the
server's GIL; a crash or out-of-memory in training kills the child, not the server, and
cancelling is terminating it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..lifecycle import PARENT_PID_ENV
from .accepted_corpus import TRAIN_SPLIT, CorpusInfo, JobCancelled
from .jobs import JobFailed

__all__ = ["run_training_process", "training_config"]

# Launcher variables a server started under torchrun must not pass on to its training child.
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


def training_config(
    mode: str, steps: int, lr: float, corpus: CorpusInfo, base: Path, run_dir: Path, device: Any
) -> Path:
    """Write the run's ``config.yaml`` beside ``run_dir`` (from the served weights ``base``, no
    validation inside the run, batch ``min(4, training objects)``); returns its path."""
    from ..train.config import TrainConfig, dump_config

    batch = max(1, min(4, corpus.train_objects))
    data: dict[str, Any] = {
        "corpus": str(corpus.folder),
        "train_split": TRAIN_SPLIT,
        "val_split": None,
        "batch_size": batch,
        "workers": 0,
        "clicks": 3,
    }
    if mode == "decoder" and corpus.train_slices <= steps * batch:
        # Fewer slices than samples to draw: embed each once (medsam.train.embedding_store).
        data["cache_embeddings"] = str(run_dir.parent / "embeddings")
    cfg = TrainConfig.from_dict(
        {
            "model": {"arch": None, "checkpoint": str(base), "contract": None},
            "data": data,
            "train": {
                "mode": mode,
                "epochs": 0,
                "max_steps": steps,
                "lr": lr,
                "seed": 0,
                "device": "cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu",
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


def run_training_process(
    config_path: Path,
    job_dir: Path,
    run_dir: Path,
    *,
    threads: int,
    python: str,
    on_start: Callable[[subprocess.Popen[bytes]], None],
    cancelled: Callable[[], bool],
    on_log: Callable[[str], None],
    on_metrics: Callable[[int, float | None], None],
) -> None:
    """Run the training child until it ends; raises :class:`JobCancelled` when ``cancelled()``
    turned true (the caller terminates the process), :class:`JobFailed` when the run failed."""
    import medsam

    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    src = str(Path(medsam.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[PARENT_PID_ENV] = str(os.getpid())  # the child ends with the server (medsam.lifecycle)
    log_path, result_path = job_dir / "train.log", job_dir / "result.json"
    result_path.unlink(missing_ok=True)
    cmd = [python, "-m", "medsam.train.worker", str(config_path), str(result_path)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(job_dir), env=env
        )
    on_start(proc)
    try:
        if hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    except OSError:
        pass
    if cancelled():  # cancelled while starting
        proc.terminate()
    offset = 0
    while True:
        rc = proc.poll()
        offset = _follow_log(log_path, offset, on_log)
        _read_metrics(run_dir / "metrics.csv", on_metrics)
        if rc is not None:
            break
        time.sleep(0.2)
    if cancelled():
        raise JobCancelled()
    result = _read_result(result_path)
    if rc != 0 or not result.get("ok"):
        reason = result.get("error") or f"no result written (exit status {rc})"
        raise JobFailed(f"training failed: {reason}", 500)
    if not (run_dir / "latest.pt").is_file():
        raise JobFailed("training finished without writing a checkpoint", 500)


def _read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _follow_log(path: Path, offset: int, on_log: Callable[[str], None]) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode("utf-8", "replace").splitlines():
        if line.strip():
            on_log(line.rstrip())
    return offset + end


def _read_metrics(path: Path, on_metrics: Callable[[int, float | None], None]) -> None:
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split") == "train"]
    except (OSError, csv.Error):
        return
    if rows:
        last = rows[-1]
        try:
            on_metrics(int(last["step"]), float(last["loss"]) if last.get("loss") else None)
        except (KeyError, ValueError):
            return
