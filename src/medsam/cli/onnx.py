"""``medsam export-onnx``: write an ONNX export (encoder, decoders, contract JSON) of a checkpoint.

medsam export-onnx [--checkpoint CKPT] -o DIR [--int8]
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..contract_names import ONNX_CONTRACT_NAMES
from .options import add_contract_option

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Subparsers) -> None:
    """Add ``export-onnx`` to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "export-onnx",
        help="export a checkpoint to ONNX (encoder, decoders, preprocessing contract)",
        description=(
            "Write encoder.onnx, decoder.onnx, decoder_points.onnx and medsam_onnx.json (the "
            "preprocessing contract: resize, normalisation, mask threshold) into DIR. The encoder "
            "takes the preprocessed (1, 3, S, S) image; preprocessing follows the JSON. Needs the "
            "export extra: pip install 'medsam[export]'."
        ),
    )
    p.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--int8", action="store_true", help="also write encoder.int8.onnx (int8 weights)")
    p.add_argument("--int8-decoder", action="store_true", help="with --int8, quantise the decoders too")
    p.add_argument("--no-points-decoder", action="store_true", help="leave out decoder_points.onnx (box prompts only)")
    add_contract_option(p, ONNX_CONTRACT_NAMES)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medsam export-onnx``; returns the exit code."""
    import warnings

    from ..export.onnx import DEFAULT_OPSET, export_onnx
    from ..model.sam import MedSAMModel
    from ..weights import CheckpointError, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.checkpoint, device="cpu")
    if not isinstance(model, MedSAMModel):
        raise CheckpointError(f"{model.config.name}: ONNX export takes SAM, MedSAM and LiteMedSAM models")
    result = export_onnx(
        model,
        args.output,
        opset=args.opset or DEFAULT_OPSET,
        quantize="int8" if args.int8 else None,
        quantize_decoder=bool(args.int8 and args.int8_decoder),
        points_decoder=not args.no_points_decoder,
        contract=args.contract,
        verify=not args.no_verify,
    )
    contract = result.contract
    print(
        f"model: {model.config.name}, contract: {contract['name']} "
        f"(resize {contract['resize']['rule']}, normalisation {contract['normalization']['type']}), "
        f"opset {result.opset}"
    )
    for path in (
        result.encoder,
        result.decoder,
        result.decoder_points,
        result.encoder_int8,
        result.decoder_int8,
        result.decoder_points_int8,
        result.metadata,
    ):
        if path is not None:
            print(f"wrote {path}")
    if result.verification:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in result.verification.items())
        print(f"relative error vs PyTorch: {errs}")
    return 0
