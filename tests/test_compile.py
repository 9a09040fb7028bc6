"""torch.compile of the image encoder: same embedding as eager, in place, persistent cache.

Compiling vit_tiny with inductor takes about 40 s on one core (cold cache, in a fresh folder);
the second process, which must hit the persistent cache, about 10 s. Skipped when inductor cannot
build C++ here (no compiler, headers or OpenMP); any other compile failure is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import medsam
from medsam.compile import compile_model, cpp_compiler_available, is_compiled, uncompile_model

pytestmark = [
    pytest.mark.skipif(not cpp_compiler_available(), reason="inductor needs a C++ compiler"),
    # raised inside torch's own modules when inductor loads them
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def _is_toolchain_error(exc: BaseException) -> bool:
    """Whether a compile failure comes from the C++ toolchain (compiler, headers, OpenMP)."""
    text = "".join(f"{type(e).__name__}: {e}" for e in _chain(exc)).lower()
    return any(
        k in text
        for k in (
            "cppcompileerror",
            "invalidcxxcompiler",
            "c++ compile error",
            "no such file or directory",
            "omp.h",
            "command not found",
        )
    )


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's caches (compiled frames, guards) emptied after each test: left behind, they made a
    later ``torch.compile`` of another model in the same process several times slower."""
    yield
    torch._dynamo.reset()


def test_compiled_encoder_matches_eager_and_cache_persists(tmp_path, monkeypatch):
    # compile_model points TORCHINDUCTOR_CACHE_DIR at the cache; monkeypatch restores it afterwards.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    torch.manual_seed(0)
    model = medsam.build_model("vit_tiny").eval()
    names = list(model.state_dict())
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = model.embed_image(x)

    cache = tmp_path / "inductor"
    compile_model(model, cache_dir=cache)
    assert is_compiled(model.image_encoder) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.resolve())
    assert list(model.state_dict()) == names  # compiled in place: checkpoints and fingerprints unchanged
    try:
        with torch.inference_mode():
            compiled = model.embed_image(x)
    except Exception as exc:
        if not _is_toolchain_error(exc):
            raise  # the model does not compile: a real regression, not a missing tool
        pytest.skip(f"inductor cannot build C++ here: {type(exc).__name__}: {str(exc)[:200]}")
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4)
    assert float((compiled - eager).norm() / eager.norm()) < 1e-4
    assert any(cache.rglob("*")), "nothing was written to the persistent cache"

    # The predictor uses the compiled encoder transparently.
    predictor = medsam.Predictor(model)
    from conftest import smooth_image

    predictor.set_image(smooth_image(64, 80))
    assert predictor.predict(boxes=[[5, 5, 60, 50]]).masks.shape == (1, 64, 80)

    uncompile_model(model)
    assert not is_compiled(model.image_encoder)
    assert not any("forward" in vars(m) for m in model.image_encoder.modules())  # eager attention again
    with torch.inference_mode():
        assert torch.equal(model.embed_image(x), eager)

    # A second process with the same cache folder reuses the compiled graph.
    script = textwrap.dedent(f"""
        import torch
        import medsam
        from medsam.compile import compile_model
        from torch._dynamo.utils import counters
        torch.manual_seed(0)
        model = compile_model(medsam.build_model("vit_tiny").eval(), cache_dir={str(cache)!r})
        with torch.inference_mode():
            model.embed_image(torch.rand(1, 3, 256, 256))
        print("HITS", counters["inductor"]["fxgraph_cache_hit"], "MISSES", counters["inductor"]["fxgraph_cache_miss"])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("HITS")][-1].split()
    hits, misses = int(line[1]), int(line[3])
    assert hits >= 1 and misses == 0, done.stdout


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        compile_model(medsam.build_model("vit_tiny"), mode="fastest")
