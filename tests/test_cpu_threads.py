"""The CPU thread policy (medsam.cpu_threads) and that the command line and the workbench apply
it. No timings: the policy's effect on speed is measured by benchmarks/run.py --background-load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medsam import cpu_threads
from medsam.cpu_threads import CpuSample

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", cpu_threads.THREADS_ENV)
    }
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.mark.parametrize(
    "others, cores, expected",
    [(0.0, 2, 2), (0.3, 2, 2), (1.0, 2, 1), (0.9, 2, 1), (1.8, 2, 1), (3.0, 8, 5), (-0.5, 4, 4)],
)
def test_free_cores_subtracts_what_other_processes_use(monkeypatch, others, cores, expected):
    own_used = 0.7  # this process's own CPU time over the window is not "others"
    start = CpuSample(wall=10.0, busy=100.0, own=5.0)
    end = CpuSample(wall=12.0, busy=100.0 + 2.0 * others + own_used, own=5.0 + own_used)
    monkeypatch.setattr(cpu_threads, "sample", lambda: end)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: cores)
    assert cpu_threads.free_cores(start) == expected


def test_free_cores_without_proc_stat_is_every_core(monkeypatch):
    monkeypatch.setattr(cpu_threads, "sample", lambda: CpuSample(wall=3.0, busy=None, own=0.0))
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 3)
    assert cpu_threads.free_cores(CpuSample(wall=1.0, busy=None, own=0.0)) == 3


_CLI_PROBE = textwrap.dedent(
    """
    import os, sys
    import medsam.cpu_threads as ct
    ct.free_cores = lambda since=None: 1           # as if one of the cores were busy
    from medsam.cli import main
    code = main(["info"])
    import torch
    print(code, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"))
    """
)


@pytest.mark.skipif(os.cpu_count() is None, reason="needs a core count")
def test_the_command_line_applies_the_policy_before_torch_starts():
    proc = subprocess.run([sys.executable, "-c", _CLI_PROBE], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-4:] == ["0", "1", "PASSIVE", "1"], proc.stdout
    # An explicit choice is kept.
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_PROBE],
        capture_output=True,
        text=True,
        env=_env(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE"),
        timeout=120,
    )
    assert proc.stdout.split()[-4:] == ["0", "2", "ACTIVE", "2"], proc.stdout + proc.stderr[-1000:]


def test_the_workbench_adapts_the_thread_count_to_the_load(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from conftest import smooth_image
    from medsam.model import build_model
    from medsam.server import create_app

    Image.fromarray(smooth_image(48, 56, seed=1)).save(tmp_path / "a.png")
    torch.manual_seed(0)
    app = create_app(tmp_path, model=build_model("vit_tiny").eval())
    before = torch.get_num_threads()
    seen = []

    def fake_free(since=None):
        seen.append(since)
        return 1

    monkeypatch.setattr(cpu_threads, "free_cores", fake_free)
    import medsam.predictor

    used = []
    original = medsam.predictor.Predictor.predict

    def predict(self, *a, **k):  # runs in the request's thread: the count it computes with
        used.append(torch.get_num_threads())
        return original(self, *a, **k)

    monkeypatch.setattr(medsam.predictor.Predictor, "predict", predict)
    monkeypatch.setattr(cpu_threads, "_last", CpuSample(wall=0.0, busy=0.0, own=0.0))  # long ago
    monkeypatch.setattr(cpu_threads, "_chosen", None)
    monkeypatch.delenv(cpu_threads.THREADS_ENV, raising=False)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as c:
            r = c.post("/segment", json={"image_id": "a.png", "box": [5, 5, 40, 40], "zoom": False})
            assert r.status_code == 200
            assert used == [1] and len(seen) == 1
            assert isinstance(seen[0], CpuSample)  # measured over the time since the last request
            c.post("/segment", json={"image_id": "a.png", "box": [5, 5, 40, 40], "zoom": False})
            assert len(seen) == 1 and used == [1, 1]  # measured at most once a second, applied every time
    finally:
        torch.set_num_threads(before)
    assert np.isfinite(r.json()["score"])
