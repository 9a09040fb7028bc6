"""Reading and writing every checkpoint format MedSAM users hold.

Accepted inputs (``load_model``):
- official plain state dicts: ``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth`` (and ViT-L/H);
- training checkpoints ``{"model": state_dict, "optimizer": ..., "epoch": ...}`` (also
  ``"state_dict"``), with or without the ``module.`` prefix that DDP adds;
- LiteMedSAM's ``lite_medsam.pth`` (TinyViT encoder);
- safetensors files written by :func:`save_model` (config and contract in the metadata) or by
  anyone else (architecture inferred from the tensor shapes);
- the SAM2 family: official SAM2 / SAM2.1 checkpoints (``{"model": state_dict}``) and MedSAM2's
  (:func:`infer_sam2_config`);
- SAM-Med3D and SAM-Med3D-turbo (``{"model_state_dict": ..., "args": ..., ...}``: the argparse
  options and numpy numbers beside the weights are read as data, :func:`infer_sam_med3d_config`).

Pickled files are opened with ``torch.load(weights_only=True)`` only: a pickle that tries to build
arbitrary objects is refused, never executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .io.atomic import atomic_output, write_json
from .model.registry import CONFIGS, ModelConfig, build_model
from .model.sam import MedSAMModel
from .model.sam2 import SAM2_CONFIGS, SAM2Config, SAM2Model
from .model.sam_med3d import SAM_MED3D_CONFIGS, SamMed3DConfig, SamMed3DModel
from .preprocess import CONTRACT_NAMES, Contract

PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
SAFETENSORS_CONFIG_KEY = "medsam_config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the raw tensors of a checkpoint file and any metadata stored with it.

    Returns (state_dict with ``module.`` prefixes removed, metadata dict).
    Raises :class:`CheckpointError` with one clear sentence for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    metadata: dict[str, Any] = {}
    state: Mapping[str, torch.Tensor]
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        if SAFETENSORS_CONFIG_KEY in raw_meta:
            try:
                metadata = json.loads(raw_meta[SAFETENSORS_CONFIG_KEY])
            except ValueError:
                raise CheckpointError(f"{path}: the {SAFETENSORS_CONFIG_KEY} metadata is not JSON") from None
            if not isinstance(metadata, dict):
                raise CheckpointError(f"{path}: the {SAFETENSORS_CONFIG_KEY} metadata is not a JSON object")
    else:
        obj = load_weights_only(path)
        state = _unwrap(obj, path)
    cleaned = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor")
        cleaned[key[len("module.") :] if key.startswith("module.") else key] = value
    return cleaned, metadata


def load_weights_only(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)`` with every failure turned into one
    :class:`CheckpointError` sentence: a pickle holding Python objects other than tensors is
    refused as such (never with torch's advice to retry with ``weights_only=False``), anything
    else unreadable (a text file, a truncated zip) is named as not a PyTorch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_record_globals()):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text and _is_parseable_pickle(path):
            raise CheckpointError(
                f"{path}: refused to unpickle: the file contains Python objects other than "
                "tensors (it could run code). Only plain state dicts and training checkpoints "
                "of tensors are loaded."
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_reason(text)})"
        ) from None


def _record_globals() -> list[Any]:
    """Plain records that training scripts store beside the weights and the weights-only loader
    may rebuild: argparse options and numpy scalars (SAM-Med3D's released checkpoints hold
    both). They are data; none of them runs code."""
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2, numpy 1
    multiarray = core.multiarray
    dtypes = [type(np.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "uint8", "bool")]
    return [argparse.Namespace, np.dtype, multiarray.scalar, *dtypes]


def _first_reason(text: str) -> str:
    """The first line of an error that is not torch's weights_only advice."""
    for line in text.splitlines():
        line = line.strip()
        if line and "weights_only" not in line and "Weights only load failed" not in line:
            return line[:200]
    return "unreadable"


def _is_parseable_pickle(path: Path) -> bool:
    """Whether the file (or the ``data.pkl`` of a zip checkpoint) is a well-formed pickle.

    Uses :mod:`pickletools`, which only reads opcodes and never executes them: a well-formed
    pickle that the weights-only unpickler rejected holds objects other than tensors.
    """
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                payload = zf.read(names[0])
        else:
            payload = path.read_bytes()
        for _ in pickletools.genops(io.BytesIO(payload)):
            pass
        return True
    except Exception:
        return False


def _unwrap(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path}: no model state dict found in the checkpoint")


def infer_config(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Infer the architecture from tensor names and shapes.

    ViT encoders: width from ``patch_embed.proj``, depth from the block count, head size from the
    relative-position tables, global blocks from the longer tables, input size from ``pos_embed``.
    A TinyViT encoder (``image_encoder.layers.*``) is LiteMedSAM.
    """
    if not any(k.startswith(PREFIXES) for k in state):
        raise CheckpointError(
            "not a SAM/MedSAM checkpoint: no image_encoder/prompt_encoder/mask_decoder weights "
            f"(first keys: {list(state)[:3]})"
        )
    if "image_encoder.patch_embed.proj.weight" in state:
        proj = state["image_encoder.patch_embed.proj.weight"]
        embed_dim, patch = proj.shape[0], proj.shape[-1]
        pos = state.get("image_encoder.pos_embed")
        grid = pos.shape[1] if pos is not None else 64
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
        head_dim = rel[0].shape[1]
        global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
        window = next(((r.shape[0] + 1) // 2 for r in rel if r.shape[0] != 2 * grid - 1), 14)
        shape: dict[str, Any] = dict(
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // head_dim,
            global_attn_indexes=global_idx,
            window_size=window,
            embedding_size=grid,
        )
        adapter = state.get("image_encoder.blocks.0.Space_Adapter.D_fc1.weight")
        if adapter is not None:  # Med-SA adapters (the scale is not in the tensors: Med-SA's 0.5)
            return ModelConfig(name="vit_medsa", adapter="medsa", adapter_ratio=adapter.shape[0] / embed_dim, **shape)
        for _name, cfg in CONFIGS.items():
            if (
                cfg.encoder == "vit"
                and (cfg.embed_dim, cfg.depth, cfg.img_size) == (embed_dim, depth, grid * patch)
                and cfg.global_attn_indexes == global_idx
            ):
                return cfg
        return ModelConfig(name="custom_vit", **shape)
    if any(k.startswith("image_encoder.layers.") for k in state):
        return CONFIGS["lite"]
    raise CheckpointError("checkpoint has no recognisable image encoder (neither ViT nor TinyViT)")


SAM2_KEY = "image_encoder.trunk.patch_embed.proj.weight"
PATCH_KEY = "image_encoder.patch_embed.proj.weight"


def is_sam_med3d(state: Mapping[str, torch.Tensor]) -> bool:
    """A SAM-Med3D state dict: its patch embedding is a 3D convolution."""
    patch = state.get(PATCH_KEY)
    return patch is not None and patch.dim() == 5


def infer_sam_med3d_config(state: Mapping[str, torch.Tensor]) -> SamMed3DConfig:
    """The SAM-Med3D architecture of a state dict: width and patch size from the patch embedding,
    the input side from the absolute position embedding, depth from the block count, head size
    and the windowed blocks from the relative-position tables."""
    try:
        patch = state[PATCH_KEY]
        grid = int(state["image_encoder.pos_embed"].shape[1])
        blocks = {int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")}
        depth = 1 + max(blocks)
        lengths = [int(state[f"image_encoder.blocks.{i}.attn.rel_pos_d"].shape[0]) for i in range(depth)]
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_d"].shape[1])
        out_chans = int(state["image_encoder.neck.0.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"a SAM-Med3D checkpoint without the expected encoder tensors ({exc})") from None
    windowed = [n for n in lengths if n != 2 * grid - 1]
    window = (windowed[0] + 1) // 2 if windowed else 14
    return SamMed3DConfig(
        img_size=grid * int(patch.shape[2]),
        patch_size=int(patch.shape[2]),
        embed_dim=int(patch.shape[0]),
        depth=depth,
        num_heads=int(patch.shape[0]) // head_dim,
        global_attn_indexes=tuple(i for i, n in enumerate(lengths) if n == 2 * grid - 1),
        window_size=window,
        prompt_embed_dim=out_chans,
    )


def infer_sam2_config(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str] | None = None) -> SAM2Config:
    """The SAM2-family configuration of a state dict.

    The trunk (width from ``patch_embed``, depth from the block count) picks one of the released
    Hiera sizes; ``no_obj_embed_spatial`` tells SAM2.1 from SAM2. The input size is not in the
    shapes: a file named ``MedSAM2*.pt`` (MedSAM2's released checkpoints) is MedSAM2's 512 px
    tiny model, anything else 1024 px; ``load_model(arch=...)`` decides otherwise.
    """
    embed_dim = int(state[SAM2_KEY].shape[0])
    blocks = [k for k in state if k.startswith("image_encoder.trunk.blocks.") and k.split(".")[3].isdigit()]
    if not blocks:
        raise CheckpointError("a SAM2-family checkpoint without trunk blocks (image_encoder.trunk.blocks.*)")
    depth = 1 + max(int(k.split(".")[3]) for k in blocks)
    version = "2.1" if "no_obj_embed_spatial" in state else "2"
    name = Path(path).name if path is not None else ""
    if name.lower().startswith("medsam2") and version == "2.1":
        candidate = SAM2_CONFIGS["medsam2"]
        if (candidate.embed_dim, sum(candidate.stages)) == (embed_dim, depth):
            return candidate
    prefix = "sam2.1_hiera_" if version == "2.1" else "sam2_hiera_"
    for cfg_name, cfg in SAM2_CONFIGS.items():
        if cfg_name.startswith(prefix) and (cfg.embed_dim, sum(cfg.stages)) == (embed_dim, depth):
            return cfg
    raise CheckpointError(
        f"a SAM2-family checkpoint with a Hiera trunk of width {embed_dim} and {depth} blocks matches no "
        f"released configuration ({', '.join(sorted(SAM2_CONFIGS))}); name one with arch="
    )


AnyConfig = ModelConfig | SAM2Config | SamMed3DConfig
AnyModel = MedSAMModel | SAM2Model | SamMed3DModel


def _config_by_name(name: str) -> AnyConfig:
    for table in (CONFIGS, SAM2_CONFIGS, SAM_MED3D_CONFIGS):
        if name in table:
            return table[name]
    known = sorted([*CONFIGS, *SAM2_CONFIGS, *SAM_MED3D_CONFIGS])
    raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(known)}")


def _load_default(contract: str | None, device: torch.device) -> MedSAMModel:
    """The bundled weights, or (with a warning) the seeded random stand-in."""
    import warnings

    from .default_model import UNTRAINED_WARNING, bundled_checkpoint, untrained_default

    path = bundled_checkpoint()
    if path is None:
        warnings.warn(UNTRAINED_WARNING, stacklevel=3)
        return untrained_default(contract, device)
    model = load_model(path, contract=contract, device=device)
    if not isinstance(model, MedSAMModel):
        raise CheckpointError(f"{path}: the bundled default is not a SAM/MedSAM/LiteMedSAM model")
    # Meant for laptops: a Predictor runs its encoder in bfloat16 where the CPU has it
    # (masks agree with float32 on >= 99 % of pixels: docs/performance.md).
    model.preferred_precision = "auto"
    return model


def load_model(
    checkpoint: str | os.PathLike[str] | None = None,
    contract: str | None = None,
    device: str | torch.device | None = None,
    config: AnyConfig | str | None = None,
    *,
    arch: str | None = None,
) -> AnyModel:
    """Load a model from any supported checkpoint, in eval mode: a :class:`MedSAMModel` (SAM,
    MedSAM, LiteMedSAM), a :class:`medsam.model.sam2.SAM2Model` (SAM2, SAM2.1, MedSAM2) or a
    :class:`medsam.model.sam_med3d.SamMed3DModel` (SAM-Med3D, SAM-Med3D-turbo).

    Args:
        checkpoint: path, or the name of an official checkpoint (``"sam_vit_b"``,
            ``"sam2.1_hiera_tiny"``, ``"MedSAM2_latest"``, ``"sam_med3d_turbo"``, ...: fetched into
            the cache by :mod:`medsam.hub`); ``None`` loads the embedded default model.
        contract: override the preprocessing contract (one of ``CONTRACT_NAMES``). Default: the
            one stored with the checkpoint, else the architecture's default (MedSAM's for ViT-B,
            SAM's for ViT-L/H, LiteMedSAM's for TinyViT, SAM2's, MedSAM2's).
        device: where to put the model; default picks CUDA, then MPS, then CPU.
        config: force an architecture (a config or a registered name) instead of inferring it.
        arch: a registered architecture name (``vit_b`` ... ``lite``, ``sam2.1_hiera_tiny`` ...,
            ``medsam2``); the same as ``config=NAME``.
    """
    from .device import pick_device

    if checkpoint is None:
        return _load_default(contract, pick_device(device))
    from .hub import HubError, resolve_checkpoint

    try:
        checkpoint, named_arch = resolve_checkpoint(checkpoint)
    except HubError as exc:
        raise CheckpointError(str(exc)) from None
    if config is None and arch is None:
        arch = named_arch
    state, metadata = read_state_dict(checkpoint)
    chosen_config = config if config is not None else arch
    cfg: AnyConfig
    if chosen_config is not None:
        cfg = _config_by_name(chosen_config) if isinstance(chosen_config, str) else chosen_config
    elif "config" in metadata:
        stored = metadata["config"]
        try:
            if isinstance(stored, dict) and stored.get("family") == "sam2":
                cfg = SAM2Config.from_dict(stored)
            elif isinstance(stored, dict) and stored.get("family") == "sam_med3d":
                cfg = SamMed3DConfig.from_dict(stored)
            else:
                cfg = ModelConfig.from_dict(stored)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{checkpoint}: the stored model configuration is not valid ({exc})") from None
    elif SAM2_KEY in state:
        cfg = infer_sam2_config(state, checkpoint)
    elif is_sam_med3d(state):
        cfg = infer_sam_med3d_config(state)
    else:
        cfg = infer_config(state)
    chosen = contract or metadata.get("contract") or cfg.default_contract
    known = ("sam_med3d",) if isinstance(cfg, SamMed3DConfig) else CONTRACT_NAMES
    if not isinstance(chosen, str) or chosen not in known:
        raise CheckpointError(f"unknown preprocessing contract {chosen!r} for this model; known: {known}")
    model: AnyModel
    try:
        if isinstance(cfg, SAM2Config):
            model = SAM2Model(cfg, chosen)
        elif isinstance(cfg, SamMed3DConfig):
            model = SamMed3DModel(cfg, chosen)
        else:
            model = build_model(cfg, contract=chosen)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint}: the model configuration does not build a model ({exc})") from None
    _load_strict(model, state, checkpoint)
    threshold = metadata.get("mask_threshold")
    if threshold is not None and chosen == metadata.get("contract") and hasattr(model, "mask_threshold"):
        try:  # the threshold the model was calibrated to, valid for its contract
            model.mask_threshold = Contract(chosen, model.input_size, threshold).mask_threshold
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint}: stored mask_threshold: {exc}") from None
    return model.to(pick_device(device)).eval()


def _load_strict(model: AnyModel, state: Mapping[str, torch.Tensor], path: object) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with the wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(expected[k].shape)})"
            )
        raise CheckpointError(f"{path}: checkpoint does not fit the {model.config.name} model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_model(model: AnyModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as safetensors (config and contract in its metadata, and its calibrated
    ``mask_threshold`` when it has one) plus a JSON sidecar.

    ``path`` is the ``.safetensors`` file; the sidecar is the same name with ``.json``. Both are
    written atomically (temporary file, then rename).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"config": model.config.to_dict(), "contract": model.contract, **(extra or {})}
    threshold = getattr(model, "mask_threshold", None)
    if threshold is not None:
        info["mask_threshold"] = float(threshold)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={SAFETENSORS_CONFIG_KEY: json.dumps(info)})
    write_json(path.with_suffix(".json"), info, indent=2)
    return path
