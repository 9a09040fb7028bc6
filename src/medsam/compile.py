"""Optional ``torch.compile`` of the image encoder (and the decoder), with a persistent cache.

    import medsam
    from medsam.compile import compile_model

    model = compile_model(medsam.load_model("medsam_vit_b.pth"))   # compiles lazily, on first use
    predictor = medsam.Predictor(model)
    predictor.set_image(image)      # first call: compilation (35-140 s on a 2-core CPU)
    predictor.predict(boxes=...)

On a CPU the compiled encoders measured slower than eager PyTorch (ViT-B 4.98 s vs 3.60 s,
LiteMedSAM 0.60 s vs 0.39 s, docs/export.md): inductor compiles the plain module forward, not the
eager CPU inference paths. Compile for a GPU or for training, not for CPU inference.

The modules are compiled in place (``nn.Module.compile``): parameter names, ``state_dict``,
``save_model`` and the embedding-cache fingerprint are unchanged, and :func:`uncompile_model`
returns to eager execution. Inductor's FX graph cache is switched on and pointed at a persistent
folder, so a second process with the same model, input size, torch version and compiler reuses
the generated kernels instead of compiling them again (dynamo still traces the model, which is the
part that remains on a warm start).

On a CPU inductor needs a C++ compiler (g++ or clang); without one, the first call raises. The
encoder is compiled for static shapes (one input size; a new batch size recompiles once).

Inductor compiles the modules' reference forward: while it traces, the ViT attention writes its
relative-position bias as a plain broadcast sum instead of into a reused ``out=`` buffer
(:func:`medsam.model.dispatch.tracing`), and inductor plans its own buffers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_cache_dir() -> Path:
    """``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/medsam/inductor``
    (``~/.cache/medsam/inductor``)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medsam" / "inductor"


def configure_inductor_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Switch on inductor's local FX graph cache and put it (with the kernels) in ``cache_dir``.

    Uses ``torch._inductor.config.fx_graph_cache`` for the switch. The folder has no config entry
    in torch (inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it needs the path), so it is set
    here, at call time, for this process, and inductor's memoised paths are cleared as torch's own
    ``temporary_cache_dir`` does. Returns the folder.
    """
    import torch._inductor.config as inductor_config

    path = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir().resolve()
    path.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(path):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
        try:
            from torch._inductor.utils import clear_caches

            clear_caches()
        except ImportError:  # pragma: no cover - older torch
            pass
    return path


def cpp_compiler_available() -> bool:
    """Whether a C++ compiler for inductor's CPU backend is on the PATH."""
    try:
        import torch._inductor.config as inductor_config

        names = [inductor_config.cpp.cxx[0]] if inductor_config.cpp.cxx[0] else []
    except Exception:  # pragma: no cover
        names = []
    return any(shutil.which(n) for n in names + ["g++", "c++", "clang++"])


def compile_model(
    model: nn.Module,
    mode: str = "default",
    cache_dir: str | os.PathLike | None = None,
    *,
    decoder: bool = False,
    dynamic: bool | None = False,
) -> nn.Module:
    """Compile ``model.image_encoder`` (and, with ``decoder=True``, the prompt-side decoder) in place.

    Args:
        model: a :class:`medsam.model.MedSAMModel`; returned, compiled in place.
        mode: ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``).
        cache_dir: persistent inductor cache folder (default :func:`default_cache_dir`).
        decoder: also compile ``model.mask_decoder`` (dynamic in the number of prompts).
        dynamic: ``dynamic`` of ``torch.compile`` for the encoder (False: one static input shape).

    Compilation happens on the first forward call, not here.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not hasattr(model, "mask_decoder"):
        raise TypeError(f"compile_model takes SAM, MedSAM and LiteMedSAM models, not {type(model).__name__}")
    configure_inductor_cache(cache_dir)
    model.image_encoder.compile(mode=mode, dynamic=dynamic)
    if decoder:
        model.mask_decoder.compile(mode=mode, dynamic=True)
    return model


def uncompile_model(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_model`: the modules run eagerly again."""
    if not hasattr(model, "mask_decoder"):
        raise TypeError(f"uncompile_model takes SAM, MedSAM and LiteMedSAM models, not {type(model).__name__}")
    for module in (model.image_encoder, model.mask_decoder):
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return model


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place with ``nn.Module.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None
