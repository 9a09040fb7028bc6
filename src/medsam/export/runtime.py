"""Running an ONNX export with onnxruntime, behind the same interface as :class:`medsam.Predictor`.

    from medsam.export import OnnxPredictor

    predictor = OnnxPredictor("medsam-onnx")           # folder written by export_onnx
    predictor.set_image(image)                          # preprocessing: the export's contract
    result = predictor.predict(boxes=[[x0, y0, x1, y1]])  # a medsam.Prediction

Preprocessing, prompt checks and mask post-processing are the package's own
(:class:`medsam.preprocess.Contract`, :class:`medsam.predictor.Predictor`); only the two networks
run in onnxruntime. The contract is read from ``medsam_onnx.json`` and must be exactly one of the
package's contracts (:func:`medsam.export.contract.check_contract_spec`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..predictor import Prediction, Predictor
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


class OnnxPredictor(Predictor):
    """:class:`medsam.Predictor` whose networks run in onnxruntime.

    Args:
        export_dir: folder written by :func:`medsam.export.export_onnx`.
        precision: ``"fp32"`` or ``"int8"`` (the int8 encoder, and the int8 decoders when they
            were exported; needs an export made with ``quantize="int8"``).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, all cores).
        providers: onnxruntime execution providers (default CPU).
        exact_preprocessing: as for :class:`~medsam.Predictor`.

    ``set_image``, ``set_embedding``, ``predict``, ``embedding``, ``geometry`` behave as in
    :class:`~medsam.Predictor` and ``predict`` returns a :class:`~medsam.Prediction`. ``model`` is
    not a torch module here but a small description of the exported model (``input_size``,
    ``contract``, ``name``).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        precision: str = "fp32",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        exact_preprocessing: bool = False,
    ) -> None:
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}")
        self.export_dir = Path(export_dir)
        self.metadata = load_export_metadata(self.export_dir)
        self.contract = check_contract_spec(self.metadata["contract"])
        self.precision = precision
        self.exact_preprocessing = exact_preprocessing  # as Predictor's
        files = self.metadata["files"]

        def pick(key: str, required: bool) -> Path | None:
            if precision == "int8" and f"{key}_int8" in files:
                key = f"{key}_int8"
            elif precision == "int8" and key == "encoder":
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
        spec = self.metadata["contract"]
        L = int(spec["low_res_mask_size"])
        self.model = SimpleNamespace(  # what Predictor's prompt checks read from ``model``
            name=self.metadata["model"]["name"],
            input_size=self.contract.input_size,
            contract=self.contract.name,
            prompt_encoder=SimpleNamespace(mask_input_size=(L, L)),
        )
        self._embedding: torch.Tensor | None = None
        self._geometry = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _decoder(self, key: str):
        if self.files[key] is None:
            from ..predictor import PromptError

            raise PromptError(
                f"{self.export_dir} was exported without decoder_points.onnx: it answers box prompts "
                "(with or without mask_input) only; export with points_decoder=True for points"
            )
        if key not in self._decoders:
            self._decoders[key] = _session(self.files[key], self._threads, self._providers)
        return self._decoders[key]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, 256, E, E) float32 embeddings (one run each)."""
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        outs = [self._encoder.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))]
        return torch.from_numpy(np.concatenate(outs, axis=0))

    def predict(
        self,
        boxes: np.ndarray | list | None = None,
        points: np.ndarray | list | None = None,
        point_labels: np.ndarray | list | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool | str = False,
        scribbles: Sequence | None = None,
    ) -> Prediction:
        """As :meth:`medsam.Predictor.predict`: box-only prompts run ``decoder.onnx``, any other
        combination ``decoder_points.onnx``."""
        from ..predictor import multimask_mode

        if multimask_mode(multimask):
            raise ValueError("the ONNX decoders give one mask or the three alternatives, not all four in one pass")
        if scribbles is not None:
            from ..scribbles import add_scribble_points

            points, point_labels = add_scribble_points(points, point_labels, scribbles, self.geometry.original_size)
        geom = self.geometry
        n, box_t, pts_t, mask_t = self._prompts_to_tensors(boxes, points, point_labels, mask_input)
        L = self.model.prompt_encoder.mask_input_size[0]
        feeds: dict[str, np.ndarray] = {
            "image_embeddings": np.ascontiguousarray(self.embedding.cpu().numpy(), dtype=np.float32),
            "mask_input": np.zeros((n, 1, L, L), np.float32)
            if mask_t is None
            else np.ascontiguousarray(mask_t.numpy(), dtype=np.float32),
            "has_mask_input": np.array([0.0 if mask_t is None else 1.0], np.float32),
        }
        if pts_t is None and box_t is not None:
            key = "decoder"
            feeds["boxes"] = np.ascontiguousarray(box_t.numpy(), dtype=np.float32)
        else:
            key = "decoder_points"
            feeds["point_coords"], feeds["point_labels"] = pack_point_prompts(
                n,
                None if box_t is None else box_t.numpy(),
                None if pts_t is None else pts_t[0].numpy(),
                None if pts_t is None else pts_t[1].numpy(),
            )
        wanted = DECODER_OUTPUTS[2:] if multimask else DECODER_OUTPUTS[:2]
        logits_np, iou = self._decoder(key).run(wanted, feeds)
        logits = torch.from_numpy(logits_np)
        masks = np.empty((n, logits.shape[1], *geom.original_size), dtype=bool)
        chunk = max(1, int(64e6 // (logits.shape[1] * geom.original_size[0] * geom.original_size[1] * 4)))
        for i in range(0, n, chunk):
            scores = self.contract.mask_scores(logits[i : i + chunk], geom)
            masks[i : i + chunk] = (scores > self.contract.threshold).numpy()
        if not multimask:
            masks, iou = masks[:, 0], iou[:, 0]
        return Prediction(masks, iou, logits_np, geom, self.contract)
