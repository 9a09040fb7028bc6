"""The specialist network (MONAI's 2D ``UNet``), its checkpoint and its prediction.

Checkpoint: ``NAME.safetensors`` (the state dict; the description below also in the safetensors
metadata under ``medsam_specialist``) and ``NAME.json`` beside it, written atomically::

    {"format": "medsam-specialist", "version": 1, "architecture": "monai.networks.nets.UNet",
     "network": {spatial_dims, in_channels, out_channels, channels, strides, num_res_units, norm},
     "input_size": S, "pixel_mm": null | mm, "reorient": bool,
     "classes": {"labels": [0, id1, ...], "names": ["background", ...]},
     "preprocessing": {...}, "datasets": [...], "modalities": [...], "training": {...}}

Prediction: the slice is prepared as in training (:func:`medsam.specialist.data.prepare_image`:
canonical orientation, resize or fixed pixel size, min-max), the logits (C, S, S) are framed back
to the stored slice (:func:`medsam.specialist.data.logits_to_slice`: un-pad/crop, bilinear resize
to (H, W), inverse orientation) and the arg-max channel is mapped to its label id.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import ClassSet, Orientation, logits_to_slice, prepare_image

FORMAT = "medsam-specialist"
VERSION = 1
METADATA_KEY = "medsam_specialist"
PREPROCESSING = {
    "orientation": "if reorient: slices turned to the canonical in-plane orientation from case.json geometry",
    "image": "grey (colour averaged), bilinear antialiased resize to input_size x input_size, or to pixel_mm "
    "mm per pixel then centred pad/crop to input_size; min-max to [0, 1] per slice",
    "label": "ids -> class indices, nearest-neighbour resize, same framing",
    "output": "logits framed back and resized bilinearly to the slice size, arg-max, original orientation",
}


def require_monai():
    """Import MONAI, or fail with the install hint."""
    try:
        import monai
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "the specialist baseline needs MONAI: pip install 'medsam[specialist]' (or pip install monai)",
            name=exc.name,
        ) from None
    return monai


def default_network(channels: Sequence[int] = (16, 32, 64, 128, 256), num_res_units: int = 2) -> dict:
    """The network settings (without ``out_channels``): stride 2 between the levels."""
    channels = [int(c) for c in channels]
    if len(channels) < 2:
        raise ValueError(f"the U-Net needs at least 2 levels of channels, got {channels}")
    return {
        "spatial_dims": 2,
        "in_channels": 1,
        "channels": channels,
        "strides": [2] * (len(channels) - 1),
        "num_res_units": int(num_res_units),
        "norm": "INSTANCE",
    }


def build_unet(network: dict, num_classes: int) -> torch.nn.Module:
    """``monai.networks.nets.UNet`` from the settings of :func:`default_network`."""
    require_monai()
    from monai.networks.nets import UNet

    net = dict(network)
    net["out_channels"] = int(num_classes)
    return UNet(
        spatial_dims=int(net["spatial_dims"]),
        in_channels=int(net["in_channels"]),
        out_channels=int(net["out_channels"]),
        channels=tuple(int(c) for c in net["channels"]),
        strides=tuple(int(s) for s in net["strides"]),
        num_res_units=int(net["num_res_units"]),
        norm=str(net.get("norm", "INSTANCE")),
    )


@dataclass
class Specialist:
    """A trained (or initialised) specialist: the network and what it needs to be used."""

    net: torch.nn.Module
    classes: ClassSet
    input_size: int
    network: dict
    info: dict = field(default_factory=dict)
    pixel_mm: float | None = None  # None: resize every slice to input_size x input_size
    reorient: bool = True  # canonical in-plane orientation from case.json (see data.Orientation)

    @property
    def label_names(self) -> dict[int, str]:
        return dict(zip(self.classes.labels, self.classes.names))

    def description(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "architecture": "monai.networks.nets.UNet",
            "network": {**self.network, "out_channels": self.classes.num_classes},
            "input_size": int(self.input_size),
            "pixel_mm": None if self.pixel_mm is None else float(self.pixel_mm),
            "reorient": bool(self.reorient),
            "classes": self.classes.to_dict(),
            "preprocessing": PREPROCESSING,
            **{
                k: v
                for k, v in self.info.items()
                if k not in {"format", "version", "network", "classes", "input_size", "pixel_mm", "reorient"}
            },
        }

    def prepare(self, image: np.ndarray, spacing=None, orientation: Orientation | None = None) -> torch.Tensor:
        """(1, S, S) network input of one stored slice."""
        return prepare_image(image, self.input_size, spacing, self.pixel_mm, orientation)

    @torch.no_grad()
    def predict_logits(
        self,
        images: Sequence[np.ndarray],
        device: str | torch.device = "cpu",
        spacings: Sequence | None = None,
        orientations: Sequence[Orientation | None] | None = None,
    ) -> torch.Tensor:
        """(N, C, S, S) logits of N stored slices (uint8, any size) at the network's input size."""
        n = len(images)
        spacings = spacings if spacings is not None else [None] * n
        orientations = orientations if orientations is not None else [None] * n
        x = torch.stack([self.prepare(im, sp, o) for im, sp, o in zip(images, spacings, orientations)]).to(device)
        self.net.eval()
        return self.net(x).float()

    @torch.no_grad()
    def predict(
        self,
        image: np.ndarray,
        spacing=None,
        orientation: Orientation | None = None,
        device: str | torch.device = "cpu",
    ) -> np.ndarray:
        """(H, W) map of label ids (0 = background) for one stored slice, on the slice's grid.

        ``spacing`` (row, col) mm is needed when the network works at a fixed ``pixel_mm``;
        ``orientation`` is the case's (:class:`medsam.specialist.data.CaseOrientations`) when the
        network was trained with ``reorient``.
        """
        logits = self.predict_logits([image], device, [spacing], [orientation])[0]
        return self.labels_from_logits(logits, image.shape[:2], spacing, orientation)

    def labels_from_logits(self, logits: torch.Tensor, shape, spacing=None, orientation=None) -> np.ndarray:
        """(C, S, S) logits -> (H, W) label ids on the stored slice's grid."""
        full = logits_to_slice(logits, shape, spacing, self.pixel_mm, orientation)
        idx = full.argmax(0).cpu().numpy()
        return np.asarray(self.classes.labels, dtype=np.int64)[idx]


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_specialist(model: Specialist, path: str | os.PathLike, write_json: bool = True) -> Path:
    """Write ``path`` (.safetensors; description in its metadata) and, if asked, ``path`` .json."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    desc = model.description()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(desc)})
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if write_json:
        _atomic_write_text(_json_path(path), json.dumps(desc, indent=2) + "\n")
    return path


def load_specialist(path: str | os.PathLike, device: str | torch.device = "cpu") -> Specialist:
    """Rebuild a specialist from its ``.safetensors`` file (the description is in its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "unet.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no specialist checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    if METADATA_KEY in meta:
        desc = json.loads(meta[METADATA_KEY])
    elif _json_path(path).is_file():
        desc = json.loads(_json_path(path).read_text())
    else:
        raise ValueError(f"{path}: no specialist description (metadata {METADATA_KEY!r} or {_json_path(path).name})")
    if desc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a specialist checkpoint (format {desc.get('format')!r})")
    if int(desc.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: specialist checkpoint version {desc.get('version')} is newer than this medsam")
    classes = ClassSet.from_dict(desc["classes"])
    network = {k: v for k, v in desc["network"].items() if k != "out_channels"}
    net = build_unet(network, classes.num_classes)
    net.load_state_dict(load_file(str(path)), strict=True)
    info = {
        k: v
        for k, v in desc.items()
        if k not in {"network", "classes", "input_size", "preprocessing", "pixel_mm", "reorient"}
    }
    pixel_mm = desc.get("pixel_mm")
    return Specialist(
        net.to(device).eval(),
        classes,
        int(desc["input_size"]),
        network,
        info,
        pixel_mm=None if pixel_mm is None else float(pixel_mm),
        reorient=bool(desc.get("reorient", False)),
    )
