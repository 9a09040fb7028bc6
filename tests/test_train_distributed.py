"""Training in separate processes: torchrun with 2 ranks on gloo, and a run killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medsam.train.synthetic import write_synthetic_corpus
from test_train_loop import micro_overrides

PYTHON = sys.executable
TORCHRUN = shutil.which("torchrun", path=str(Path(PYTHON).parent)) or shutil.which("torchrun")

# One thread per process, whatever the machine: equal arithmetic in every run compared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

RANK_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from medsam.train.config import load_config
from medsam.train.distributed import init_distributed, cleanup
from medsam.train.loop import Trainer
out = sys.argv[1]
info = init_distributed("cpu")
trainer = Trainer(load_config(None, sys.argv[2:]), info)
trainer.fit()
torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{info.rank}.pt")
cleanup(info)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("corpus"), cases={"train": 3, "val": 1}, slices_per_case=4, seed=2
    )


def _initial_model():
    from medsam.train.config import load_config
    from medsam.train.trainable import build_initial_model

    return build_initial_model(load_config(None, micro_overrides("/x", "/y", "train.max_steps=1")).model, seed=0)


def _outputs(model_state, x, box):
    model = _initial_model()
    model.load_state_dict(model_state)
    model.eval()
    with torch.no_grad():
        out = model.decode(model.embed_image(x), boxes=box)
    return out.logits, out.iou


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_torchrun_two_ranks_equal_one_process_with_the_same_global_batch(corpus, tmp_path):
    script = tmp_path / "rank_train.py"
    script.write_text(RANK_SCRIPT)
    steps = ["train.max_steps=5", "train.save_every=0", "data.val_max_samples=2"]
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    # 2 ranks x batch 2 = global batch 4 ...
    ddp = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(ddp_dir),
            *micro_overrides(corpus, ddp_dir / "run", *steps),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # ... = 1 process x batch 4, same seed, same data order
    single = subprocess.run(
        [
            PYTHON,
            str(script),
            str(single_dir),
            *micro_overrides(corpus, single_dir / "run", *steps, "data.batch_size=4"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    r0 = torch.load(ddp_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(ddp_dir / "rank1.pt", weights_only=True)
    one = torch.load(single_dir / "rank0.pt", weights_only=True)
    for k in r0:  # DDP keeps the ranks bit-identical
        assert torch.equal(r0[k], r1[k]), k
    # The checkpoint written by rank 0 holds the same weights, at the same position.
    ckpt = torch.load(ddp_dir / "run" / "latest.pt", weights_only=True)
    assert ckpt["global_step"] == 5 and ckpt["world_size"] == 2 and ckpt["global_batch"] == 4
    assert all(torch.equal(ckpt["model"][k], r0[k]) for k in r0)

    # Versus one process: equal up to the order of floating-point sums. Adam turns the rounding
    # noise of parameters whose true gradient is zero (attention key biases) into +-lr steps, so
    # compare the function the model computes, and nearly all weights element by element.
    total = sum(v.numel() for v in r0.values())
    off = sum(int(((r0[k] - one[k]).abs() > 1e-5).sum()) for k in r0)
    assert off / total < 1e-3, off
    init = _initial_model().state_dict()
    moved = sum(int(((r0[k] - init[k]).abs() > 1e-5).sum()) for k in r0)
    assert moved / total > 0.5  # the weights did change: the comparison above is not vacuous
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)
    box = torch.tensor([[5.0, 8.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]])
    (la, ia), (lb, ib) = _outputs(r0, x, box), _outputs(one, x, box)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)  # observed: ~1e-6
    torch.testing.assert_close(ia, ib, rtol=1e-4, atol=1e-4)
    # The logged training losses agree too (the mean over both ranks is logged).
    lines = lambda p: [ln.split(",")[:5] for ln in (p / "run" / "metrics.csv").read_text().splitlines()]
    for a, b in zip(lines(ddp_dir), lines(single_dir)):
        assert a[:4] == b[:4]
        if a[4] and a[4] != "loss":
            assert float(a[4]) == pytest.approx(float(b[4]), rel=1e-4)


def test_run_killed_with_sigkill_resumes_to_the_same_weights(corpus, tmp_path):
    cli = [PYTHON, "-m", "medsam", "train", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    extra = ["train.max_steps=14", "train.save_every=2", "data.val_split=null"]
    ref = subprocess.run(
        cli + micro_overrides(corpus, tmp_path / "ref", *extra), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        cli + micro_overrides(corpus, run_dir, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not (run_dir / "latest.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = torch.load(run_dir / "latest.pt", weights_only=True)["global_step"]
    assert killed_at < 14

    resumed = subprocess.run(
        cli + micro_overrides(corpus, run_dir, *extra, "train.resume=auto"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'latest.pt'} at step {killed_at}" in resumed.stderr
    a = torch.load(tmp_path / "ref" / "latest.pt", weights_only=True)
    b = torch.load(run_dir / "latest.pt", weights_only=True)
    assert b["global_step"] == a["global_step"] == 14
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-7)
