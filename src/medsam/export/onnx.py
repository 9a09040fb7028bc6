"""Export a :class:`medsam.model.MedSAMModel` to ONNX: encoder, decoders and the contract.

    from medsam import load_model
    from medsam.export import export_onnx

    result = export_onnx(load_model("medsam_vit_b.pth"), "medsam-onnx", quantize="int8")

writes into ``out_dir``:

``encoder.onnx``
    input ``image`` (1, 3, S, S) float32: exactly the tensor
    ``Contract.prepare_image(image)[0]`` returns (preprocessing stays outside the graph);
    output ``image_embeddings`` (1, 256, E, E).
``decoder.onnx`` (box prompts, the MedSAM path)
    inputs ``image_embeddings`` (1, 256, E, E), ``boxes`` (N, 4) [x0, y0, x1, y1] in network-input
    coordinates, ``mask_input`` (N, 1, 4E, 4E) low-resolution logits and ``has_mask_input`` (1,)
    (1.0: use ``mask_input``; 0.0: ignore it, pass zeros).
``decoder_points.onnx`` (any prompt, SAM's ONNX convention)
    inputs ``image_embeddings``, ``point_coords`` (N, P, 2), ``point_labels`` (N, P) float32 with
    1 = foreground point, 0 = background point, 2 = box top-left corner, 3 = box bottom-right corner,
    -1 = padding ("not a point"), ``mask_input``, ``has_mask_input``. Boxes with points: the points,
    then the two corners (labels 2, 3). Points without a box: append one padding point (0, 0) with
    label -1. Mask only: P = 0.
Both decoders output ``low_res_logits`` (N, 1, 4E, 4E), ``iou_predictions`` (N, 1) and, for
``multimask``, ``multimask_logits`` (N, 3, 4E, 4E), ``multimask_iou`` (N, 3); N (and P) are dynamic.
``medsam_onnx.json``
    the preprocessing contract (:mod:`medsam.export.contract`), the model config, the files
    with their inputs/outputs and SHA-256, and the verification errors measured at export time.
``encoder.int8.onnx`` (``quantize="int8"``)
    the encoder with int8 weights (onnxruntime dynamic quantisation of MatMul/Gemm weights;
    activations are quantised on the fly). ``quantize_decoder=True`` adds ``decoder.int8.onnx``
    and ``decoder_points.int8.onnx``.

The contract JSON is also stored in every ONNX file's ``metadata_props`` (key ``medsam_contract``).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.checksum import sha256_file
from ..model.sam import MedSAMModel
from ..preprocess import model_contract
from .contract import contract_spec

FORMAT_NAME = "medsam-onnx"
FORMAT_VERSION = 1
METADATA_FILE = "medsam_onnx.json"
METADATA_KEY = "medsam_contract"
DEFAULT_OPSET = 20
# Relative error (||onnx - torch|| / ||torch||) above which an export is reported as broken.
VERIFY_TOLERANCE = 1e-3

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_OUTPUTS = ["low_res_logits", "iou_predictions", "multimask_logits", "multimask_iou"]
BOX_DECODER_INPUTS = ["image_embeddings", "boxes", "mask_input", "has_mask_input"]
POINT_DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]


class ExportError(RuntimeError):
    """The export failed or its ONNX graph does not reproduce the PyTorch model."""


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote. Paths are absolute; int8 paths are None unless requested."""

    out_dir: Path
    encoder: Path
    decoder: Path
    decoder_points: Path | None
    metadata: Path
    encoder_int8: Path | None = None
    decoder_int8: Path | None = None
    decoder_points_int8: Path | None = None
    opset: int = DEFAULT_OPSET
    contract: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------- wrappers
def _decode(model: MedSAMModel, image_embeddings, sparse, dense):
    masks, iou = model.mask_decoder.predict_masks(image_embeddings, model.prompt_encoder.get_dense_pe(), sparse, dense)
    return masks[:, :1], iou[:, :1], masks[:, 1:], iou[:, 1:]


def _dense(model: MedSAMModel, mask_input, has_mask_input, no_mask_dense):
    """The mask embedding when ``has_mask_input`` is 1, the learned no-mask embedding when 0."""
    use_mask = has_mask_input.reshape(1, 1, 1, 1) > 0.5
    return torch.where(use_mask, model.prompt_encoder.mask_downscaling(mask_input), no_mask_dense)


class EncoderGraph(nn.Module):
    """(1, 3, S, S) preprocessed image -> (1, 256, E, E) embedding."""

    def __init__(self, model: MedSAMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.embed_image(image)


class BoxDecoderGraph(nn.Module):
    """Box prompts (N, 4) (+ optional mask input) -> logits and IoU, as ``model.decode``."""

    def __init__(self, model: MedSAMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, boxes, mask_input, has_mask_input):
        sparse, no_mask_dense = self.model.prompt_encoder(points=None, boxes=boxes, masks=None)
        dense = _dense(self.model, mask_input, has_mask_input, no_mask_dense)
        return _decode(self.model, image_embeddings, sparse, dense)


class PointDecoderGraph(nn.Module):
    """SAM-style labelled points (boxes as corners 2/3, padding -1) -> logits and IoU.

    The tokens are :meth:`medsam.model.prompt_encoder.PromptEncoder.embed_labelled_points` of the
    prompts packed as :func:`medsam.export.runtime.pack_point_prompts` does.
    """

    def __init__(self, model: MedSAMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        pe = self.model.prompt_encoder
        emb = pe.embed_labelled_points(point_coords, point_labels)
        n = point_coords.shape[0]
        no_mask_dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *pe.image_embedding_size)
        dense = _dense(self.model, mask_input, has_mask_input, no_mask_dense)
        return _decode(self.model, image_embeddings, emb, dense)


# -------------------------------------------------------------------- export
def _export_graph(module, args, path: Path, input_names, output_names, dynamic_shapes, opset, metadata):
    import logging

    # The exporter logs progress and a warning (with a traceback) when it cannot down-convert to
    # an opset below its own (18); quieten both, and report the opset actually written.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                None,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export of {path.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        logger.setLevel(level)
    program.model.metadata_props[METADATA_KEY] = metadata
    program.model.producer_name = "medsam"
    tmp = path.with_name(path.name + ".tmp")
    program.save(tmp, external_data=None)
    os.replace(tmp, path)
    return int(program.model.opset_imports.get("", opset))


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


def quantize_int8(src: Path, dst: Path, per_channel: bool = True) -> Path:
    """onnxruntime dynamic quantisation: MatMul/Gemm weights to int8 (activations on the fly).

    Convolutions stay fp32 (onnxruntime's ConvInteger is slower than its fp32 convolution on CPU).
    Weights use 7 of the 8 bits (``reduce_range``): on x86 CPUs without VNNI, onnxruntime's
    uint8 x int8 kernel adds pairs of products in saturating 16-bit lanes, which full-range
    weights overflow, so the file stays accurate on whatever CPU runs it (docs/export.md).
    The ``medsam_contract`` metadata is carried over.
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(dst.name + ".tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src),
                str(tmp),
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                reduce_range=True,
                nodes_to_exclude=_batched_constant_matmuls(src),
            )
    finally:
        root.setLevel(level)
    model = onnx.load(str(tmp))
    have = {p.key for p in model.metadata_props}
    for prop in onnx.load(str(src), load_external_data=False).metadata_props:
        if prop.key not in have:
            model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(tmp))
    os.replace(tmp, dst)
    return dst


def _batched_constant_matmuls(path: Path) -> list[str]:
    """MatMul nodes whose constant operand is not a 2-D weight matrix (e.g. the encoder's
    relative-position tables, (H, hd, H)): onnxruntime's integer MatMul takes per-channel
    quantisation parameters for 2-D weights only, so these stay fp32."""
    import onnx

    model = onnx.load(str(path))
    dims = {init.name: len(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    dims[node.output[0]] = len(attr.t.dims)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and any(dims.get(i, 2) != 2 for i in node.input[1:2])
    ]


def _io_spec(session) -> dict[str, list]:
    def desc(values):
        return [
            {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape], "dtype": v.type}
            for v in values
        ]

    return {"inputs": desc(session.get_inputs()), "outputs": desc(session.get_outputs())}


def export_onnx(
    model: MedSAMModel,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    *,
    quantize_decoder: bool = False,
    points_decoder: bool = True,
    contract: str | None = None,
    verify: bool = True,
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` to ``out_dir`` (see the module docstring for the files).

    Args:
        model: the model; exported on the CPU in fp32 and eval mode (a model elsewhere or in
            another dtype is copied first; the caller's model is left as it was).
        opset: ONNX opset, 20 by default: GELU is then one ``Gelu`` node, which onnxruntime
            runs about 30 % faster (whole encoder, CPU) than the Erf arithmetic of opsets 18-19
            (onnxruntime >= 1.17 reads opset 20). 18 and 19 work too. Below 18 PyTorch's exporter
            down-converts, which fails for Pad with torch 2.13 and leaves 18 (with a warning). The
            opset actually written is recorded (``ExportResult.opset`` and the JSON).
        quantize: ``None`` or ``"int8"`` (also write ``encoder.int8.onnx``).
        quantize_decoder: with ``quantize="int8"``, also quantise the decoders.
        points_decoder: also write ``decoder_points.onnx`` (points, box + points and mask-only
            prompts); without it the export answers box prompts (with or without a mask) only.
        contract: override the model's preprocessing contract by name.
        verify: run each graph with onnxruntime on seeded inputs and compare with PyTorch; raise
            :class:`ExportError` when the relative error exceeds ``VERIFY_TOLERANCE``.
        seed: seed of the verification inputs.
    """
    if not isinstance(model, MedSAMModel):
        raise TypeError(f"ONNX export takes SAM, MedSAM and LiteMedSAM models, not {type(model).__name__}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): pip install 'medsam[export]'"
        ) from None
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).cpu().float()  # the caller's model stays where it is
    was_training = model.training
    model.eval()
    try:
        return _export(model, out, opset, quantize, quantize_decoder, points_decoder, contract, verify, seed, start)
    finally:
        model.train(was_training)


def _export(model, out, opset, quantize, quantize_decoder, points_decoder, contract, verify, seed, start):
    the_contract = model_contract(model, contract)
    E = model.prompt_encoder.image_embedding_size[0]
    L = model.prompt_encoder.mask_input_size[0]
    S = model.input_size
    spec = contract_spec(the_contract, E)
    spec_json = json.dumps(spec, sort_keys=True)

    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, S, S, generator=g)
    n = 3
    boxes = torch.sort(torch.rand(n, 2, 2, generator=g) * S, dim=1).values.reshape(n, 4)  # x0<x1, y0<y1
    mask_input = torch.randn(n, 1, L, L, generator=g) * 4
    has_mask = torch.ones(1)
    coords = torch.rand(n, 4, 2, generator=g) * S
    labels = torch.tensor([[1.0, 0.0, 2.0, 3.0]]).expand(n, -1).contiguous()
    N = torch.export.Dim("num_prompts", min=1, max=4096)
    P = torch.export.Dim("num_points", min=0, max=4096)

    paths = {k: out / f"{k}.onnx" for k in ("encoder", "decoder", "decoder_points")}
    opsets = []
    with torch.no_grad():
        embedding = model.embed_image(image)
    opsets.append(
        _export_graph(
            EncoderGraph(model),
            (image,),
            paths["encoder"],
            ENCODER_INPUTS,
            ENCODER_OUTPUTS,
            None,
            opset,
            spec_json,
        )
    )
    box_args = (embedding, boxes, mask_input, has_mask)
    opsets.append(
        _export_graph(
            BoxDecoderGraph(model),
            box_args,
            paths["decoder"],
            BOX_DECODER_INPUTS,
            DECODER_OUTPUTS,
            {"image_embeddings": None, "boxes": {0: N}, "mask_input": {0: N}, "has_mask_input": None},
            opset,
            spec_json,
        )
    )
    point_args = (embedding, coords, labels, mask_input, has_mask)
    if points_decoder:
        opsets.append(
            _export_graph(
                PointDecoderGraph(model),
                point_args,
                paths["decoder_points"],
                POINT_DECODER_INPUTS,
                DECODER_OUTPUTS,
                {
                    "image_embeddings": None,
                    "point_coords": {0: N, 1: P},
                    "point_labels": {0: N, 1: P},
                    "mask_input": {0: N},
                    "has_mask_input": None,
                },
                opset,
                spec_json,
            )
        )
    else:
        paths["decoder_points"].unlink(missing_ok=True)
    written_opset = max(opsets)
    if written_opset != opset:
        warnings.warn(f"ONNX opset {opset} was requested; the exporter wrote opset {written_opset}", stacklevel=2)

    result = ExportResult(
        out_dir=out,
        encoder=paths["encoder"],
        decoder=paths["decoder"],
        decoder_points=paths["decoder_points"] if points_decoder else None,
        metadata=out / METADATA_FILE,
        opset=written_opset,
        contract=spec,
    )
    if quantize == "int8":
        result.encoder_int8 = quantize_int8(paths["encoder"], out / "encoder.int8.onnx")
        if quantize_decoder:
            result.decoder_int8 = quantize_int8(paths["decoder"], out / "decoder.int8.onnx")
            if points_decoder:
                result.decoder_points_int8 = quantize_int8(paths["decoder_points"], out / "decoder_points.int8.onnx")
    for stale in ("encoder", "decoder", "decoder_points"):  # int8 files of an earlier export
        if getattr(result, f"{stale}_int8") is None:
            (out / f"{stale}.int8.onnx").unlink(missing_ok=True)

    sessions = {}
    files: dict[str, Any] = {}
    for key, path in [
        ("encoder", result.encoder),
        ("decoder", result.decoder),
        ("decoder_points", result.decoder_points),
        ("encoder_int8", result.encoder_int8),
        ("decoder_int8", result.decoder_int8),
        ("decoder_points_int8", result.decoder_points_int8),
    ]:
        if path is None:
            continue
        sessions[key] = _ort_session(path)
        files[key] = {
            "path": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            **_io_spec(sessions[key]),
        }

    if verify:
        result.verification = _verify(model, sessions, image, embedding, box_args, point_args)
        bad = {k: v for k, v in result.verification.items() if "int8" not in k and v > VERIFY_TOLERANCE}
        if bad:
            raise ExportError(
                f"the ONNX graphs do not reproduce the PyTorch model (relative errors {bad}, "
                f"tolerance {VERIFY_TOLERANCE}); files left in {out}"
            )

    from .. import __version__

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "medsam_version": __version__,
        "torch_version": torch.__version__,
        "opset": written_opset,
        "model": {"name": model.config.name, "encoder": model.config.encoder, "config": model.config.to_dict()},
        "contract": spec,
        "files": files,
        "decoder_prompts": {
            "decoder": "boxes (N, 4) [x0, y0, x1, y1] in network-input coordinates; mask_input "
            "(N, 1, L, L) logits with has_mask_input = [1.0], else zeros and [0.0]",
            "decoder_points": "point_coords (N, P, 2), point_labels (N, P): 1 foreground, 0 background, "
            "2 box top-left, 3 box bottom-right, -1 padding. Box + points: points then corners (2, 3). "
            "Points only: append (0, 0) with label -1. Mask only: P = 0.",
            "outputs": "low_res_logits (N, 1, L, L), iou_predictions (N, 1); multimask_logits "
            "(N, 3, L, L), multimask_iou (N, 3)",
        },
        "quantization": None
        if quantize is None
        else {
            "type": "onnxruntime.quantization.quantize_dynamic",
            "weights": "int8 (QInt8), per channel",
            "op_types": ["MatMul", "Gemm"],
            "quantized_files": [k for k in files if k.endswith("_int8")],
        },
        "verification": {
            "metric": "relative L2 error against PyTorch fp32 on seeded random inputs",
            "errors": result.verification,
        },
    }
    tmp = result.metadata.with_name(result.metadata.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, result.metadata)
    result.seconds = time.perf_counter() - start
    return result


def _verify(model, sessions, image, embedding, box_args, point_args) -> dict[str, float]:
    errors: dict[str, float] = {}
    emb = embedding.numpy()
    for key in ("encoder", "encoder_int8"):
        if key in sessions:
            got = sessions[key].run(None, {"image": image.numpy()})[0]
            errors[key] = _rel_err(got, emb)
    with torch.no_grad():
        ref_box = [t.numpy() for t in BoxDecoderGraph(model)(*box_args)]
        ref_pts = [t.numpy() for t in PointDecoderGraph(model)(*point_args)]
    for key, names, args, ref in [
        ("decoder", BOX_DECODER_INPUTS, box_args, ref_box),
        ("decoder_int8", BOX_DECODER_INPUTS, box_args, ref_box),
        ("decoder_points", POINT_DECODER_INPUTS, point_args, ref_pts),
        ("decoder_points_int8", POINT_DECODER_INPUTS, point_args, ref_pts),
    ]:
        if key in sessions:
            got = sessions[key].run(DECODER_OUTPUTS[:2], {n: a.numpy() for n, a in zip(names, args, strict=True)})
            errors[key] = max(_rel_err(got[0], ref[0]), _rel_err(got[1], ref[1]))
    return errors
