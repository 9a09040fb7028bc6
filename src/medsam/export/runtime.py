"""Running an ONNX export with onnxruntime, behind the same interface as :class:`medsam.Predictor`.

    from medsam.export import OnnxPredictor

    predictor = OnnxPredictor("medsam-onnx")           # folder written by export_onnx
    predictor.set_image(image)                          # preprocessing: the export's contract
    result = predictor.predict(boxes=[[x0, y0, x1, y1]])  # a medsam.Prediction

:class:`OnnxModel` runs the graphs; preprocessing, prompt checks and mask post-processing
are :class:`medsam.predictor.Predictor`'s own (``OnnxPredictor`` is a ``Predictor`` over an
``OnnxModel``), so volumes and zoom take it like any model. The contract is read from
``medsam_onnx.json`` and must be exactly one of the package's contracts
(:func:`medsam.export.contract.check_contract_spec`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.sam import DecoderOutput
from ..predictor import Predictor
from ..zoom import ZoomPolicy
from .contract import check_contract_spec
from .onnx import DECODER_OUTPUTS, FORMAT_NAME, METADATA_FILE


def load_export_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``medsam_onnx.json`` of an export folder (ValueError when it is not one)."""
    path = Path(export_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {export_dir} a folder written by export_onnx?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} metadata file")
    check_contract_spec(meta.get("contract"))
    return meta


def pack_point_prompts(
    n: int,
    boxes: np.ndarray | None = None,
    coords: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts in network coordinates -> (point_coords (n, P, 2), point_labels (n, P)) float32.

    The packing ``decoder_points.onnx`` expects (SAM's ONNX convention), token for token what
    :class:`medsam.model.prompt_encoder.PromptEncoder` builds: the points (labels 1/0), then either
    the box corners (labels 2, 3) or, with no box, one padding point (0, 0) with label -1. With
    neither points nor box (mask-only prompts) P is 0.
    """
    parts_c: list[np.ndarray] = []
    parts_l: list[np.ndarray] = []
    if coords is not None:
        parts_c.append(np.asarray(coords, np.float32).reshape(n, -1, 2))
        parts_l.append(np.asarray(labels, np.float32).reshape(n, -1))
    if boxes is not None:
        parts_c.append(np.asarray(boxes, np.float32).reshape(n, 2, 2))
        parts_l.append(np.tile(np.array([[2.0, 3.0]], np.float32), (n, 1)))
    elif coords is not None:
        parts_c.append(np.zeros((n, 1, 2), np.float32))
        parts_l.append(np.full((n, 1), -1.0, np.float32))
    if not parts_c:
        return np.zeros((n, 0, 2), np.float32), np.zeros((n, 0), np.float32)
    return (
        np.ascontiguousarray(np.concatenate(parts_c, axis=1)),
        np.ascontiguousarray(np.concatenate(parts_l, axis=1)),
    )


def _session(path: Path, threads: int | None, providers: Sequence[str] | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


class OnnxModel:
    """An ONNX export run by onnxruntime, behind the interface :class:`medsam.Predictor` uses
    (:class:`medsam.predictor.PromptableModel`): ``embed_image`` runs ``encoder.onnx``, ``decode``
    runs ``decoder.onnx`` for box-only prompts and ``decoder_points.onnx`` for any other
    combination.

    Args:
        export_dir: folder written by :func:`medsam.export.export_onnx`.
        int8: run the int8 encoder (and the int8 decoders when they were exported); needs an
            export made with ``quantize="int8"``.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, all cores).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        int8: bool = False,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.export_dir = Path(export_dir)
        self.metadata = load_export_metadata(self.export_dir)
        spec = self.metadata["contract"]
        contract = check_contract_spec(spec)
        self.contract = contract.name
        self.mask_threshold = contract.mask_threshold  # the exported model's calibrated threshold
        self.name = self.metadata["model"]["name"]
        self._input_size = int(spec["input_size"])
        self._mask_input_size = int(spec["low_res_mask_size"])
        files = self.metadata["files"]

        def pick(key: str, required: bool) -> Path | None:
            if int8 and f"{key}_int8" in files:
                key = f"{key}_int8"
            elif int8 and key == "encoder":
                raise ValueError(f"{self.export_dir} has no int8 encoder: export with quantize='int8'")
            if key not in files:
                if required:
                    raise ValueError(f"{self.export_dir}: the metadata lists no {key} file")
                return None
            path = self.export_dir / files[key]["path"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {METADATA_FILE} but missing")
            return path

        self.files = {
            "encoder": pick("encoder", True),
            "decoder": pick("decoder", True),
            "decoder_points": pick("decoder_points", False),
        }
        self._threads = threads
        self._providers = providers
        self._encoder = _session(self.files["encoder"], threads, providers)
        self._decoders: dict[str, Any] = {}

    @property
    def input_size(self) -> int:
        return self._input_size

    @property
    def mask_input_size(self) -> int:
        return self._mask_input_size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def eval(self) -> OnnxModel:
        return self

    def _decoder(self, key: str):
        if self.files[key] is None:
            from ..errors import PromptError

            raise PromptError(
                f"{self.export_dir} was exported without decoder_points.onnx: it answers box prompts "
                "(with or without mask_input) only; export with points_decoder=True for points"
            )
        if key not in self._decoders:
            self._decoders[key] = _session(self.files[key], self._threads, self._providers)
        return self._decoders[key]

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, 256, E, E) float32 embeddings (one run each)."""
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outs = [self._encoder.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))]
        return torch.from_numpy(np.concatenate(outs, axis=0))

    def decode(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        all_masks: bool = False,
    ) -> DecoderOutput:
        """As :meth:`medsam.model.MedSAMModel.decode` (one embedding for all prompts), except that
        the graphs give one mask or the three alternatives, not all four (``all_masks``)."""
        if all_masks:
            raise ValueError("the ONNX decoders give one mask or the three alternatives, not all four in one pass")
        counts = [len(t) for t in (boxes, mask_input) if t is not None] + ([len(points[0])] if points else [])
        n = counts[0] if counts else 0
        L = self._mask_input_size
        feeds: dict[str, np.ndarray] = {
            "image_embeddings": np.ascontiguousarray(image_embeddings.cpu().numpy(), dtype=np.float32),
            "mask_input": np.zeros((n, 1, L, L), np.float32)
            if mask_input is None
            else np.ascontiguousarray(mask_input.cpu().numpy(), dtype=np.float32),
            "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        }
        if points is None and boxes is not None:
            key = "decoder"
            feeds["boxes"] = np.ascontiguousarray(boxes.cpu().numpy(), dtype=np.float32)
        else:
            key = "decoder_points"
            feeds["point_coords"], feeds["point_labels"] = pack_point_prompts(
                n,
                None if boxes is None else boxes.cpu().numpy(),
                None if points is None else points[0].cpu().numpy(),
                None if points is None else points[1].cpu().numpy(),
            )
        wanted = DECODER_OUTPUTS[2:] if multimask_output else DECODER_OUTPUTS[:2]
        logits, iou = self._decoder(key).run(wanted, feeds)
        return DecoderOutput(logits=torch.from_numpy(logits), iou=torch.from_numpy(iou))


class OnnxPredictor(Predictor):
    """:class:`medsam.Predictor` over an :class:`OnnxModel`.

    Args:
        export_dir: folder written by :func:`medsam.export.export_onnx`.
        precision: ``"fp32"`` or ``"int8"`` (the int8 encoder, and the int8 decoders when they
            were exported; needs an export made with ``quantize="int8"``).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, all cores).
        providers: onnxruntime execution providers (default CPU).
        exact_preprocessing: as for :class:`~medsam.Predictor`.
        zoom: as for :class:`~medsam.Predictor` (``"auto"``: on for exports of at most 256 px).
        mask_threshold: as for :class:`~medsam.Predictor` (default: the export's contract's).

    ``set_image``, ``set_embedding``, ``predict``, ``embedding``, ``geometry`` are
    :class:`~medsam.Predictor`'s; ``model`` is the :class:`OnnxModel`. ``multimask="all"`` is
    refused (the graphs give one mask or the three alternatives).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        precision: str = "fp32",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        exact_preprocessing: bool = False,
        zoom: ZoomPolicy | bool | str | None = "auto",
        mask_threshold: float | None = None,
    ) -> None:
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}")
        model = OnnxModel(export_dir, int8=precision == "int8", threads=threads, providers=providers)
        super().__init__(
            model, precision="fp32", exact_preprocessing=exact_preprocessing, zoom=zoom, mask_threshold=mask_threshold
        )
        self.model: OnnxModel = model
        self.precision = precision

    def _make_crop_predictor(self) -> Predictor:
        # The int8 sessions belong to the OnnxModel; the crops go through the same ones.
        return Predictor(
            self.model,
            contract=self.contract.name,
            exact_preprocessing=self.exact_preprocessing,
            zoom=False,
            mask_threshold=self.contract.threshold,
        )

    @property
    def export_dir(self) -> Path:
        return self.model.export_dir

    @property
    def metadata(self) -> dict[str, Any]:
        return self.model.metadata

    @property
    def files(self) -> dict[str, Path | None]:
        return self.model.files
