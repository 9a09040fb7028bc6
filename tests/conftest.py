import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["workbench_fixtures"]
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

# CI sets MEDSAM_NO_SKIPS=1: there a skipped test (a missing oracle, browser or bundled weights)
# fails the run instead of passing quietly.
NO_SKIPS = os.environ.get("MEDSAM_NO_SKIPS") == "1"


def _skipped_reports(config: pytest.Config) -> list:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if NO_SKIPS and _skipped_reports(config):
        terminalreporter.write_line(
            f"MEDSAM_NO_SKIPS=1: {len(_skipped_reports(config))} skipped test(s) fail this run", red=True
        )


def pytest_sessionfinish(session, exitstatus):
    if NO_SKIPS and exitstatus == 0 and _skipped_reports(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def smooth_image(h: int, w: int, seed: int = 0, channels: int | None = None) -> np.ndarray:
    """A uint8 test image with structure (blobs) rather than white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w), np.float64)
    for _ in range(6):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.1, 0.3) * min(h, w)
        img += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img += 0.05 * rng.standard_normal((h, w))
    img = (img - img.min()) / (img.max() - img.min()) * 255
    img = img.astype(np.uint8)
    if channels:
        img = np.stack([np.roll(img, 3 * c, axis=1) for c in range(channels)], axis=-1)
    return img


def rel_err(a, b) -> float:
    """Relative L2 error of ``a`` against ``b`` (arrays or tensors), in float64."""
    a = torch.as_tensor(np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b), dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def seeded_tiny_model():
    """The small ``vit_tiny`` configuration with seed-0 random weights, in eval mode."""
    from medsam.model import build_model

    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


@pytest.fixture
def small_default_model(monkeypatch):
    """The untrained small default model instead of the bundled one, for tests that exercise a
    command or a file path rather than the model (fast; its masks are meaningless)."""
    import medsam.default_model

    monkeypatch.setattr(medsam.default_model, "bundled_checkpoint", lambda: None)


@pytest.fixture
def tiny_model():
    return seeded_tiny_model()
