"""The preprocessing contract written out for consumers that are not this Python package.

:func:`contract_spec` turns a :class:`medsam.preprocess.Contract` into a JSON-ready dict that says,
step by step, how an image becomes the encoder's input tensor, how prompt coordinates move into the
network frame and how low-resolution logits become a mask. It is stored in ``medsam_onnx.json``
and in the ``metadata_props`` of every exported ONNX file, so a C++/JS/C# consumer reads the
normalisation from the export instead of guessing it. MedSAM's contract has no mean/std at all
(min-max to [0, 1]); only the ``sam`` contract carries ImageNet statistics.

:func:`check_contract_spec` validates a spec read back from disk against the package's own
contracts, so :class:`medsam.export.runtime.OnnxPredictor` refuses an edited or foreign file
rather than preprocessing differently from what the spec says.
"""

from __future__ import annotations

from typing import Any

from ..preprocess import CONTRACT_NAMES, IMAGENET_MEAN, IMAGENET_STD, Contract

SPEC_VERSION = 1

_TO_RGB_UINT8 = (
    "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> (H, W, 3) uint8: uint8 data are kept; "
    "bool becomes 0/255; any other dtype is min-max scaled to 0..255 over the whole image and "
    "rounded half to even (numpy.round); alpha is dropped; grey is repeated to 3 channels (RGB order)"
)


def contract_spec(contract: Contract, embedding_size: int) -> dict[str, Any]:
    """JSON-ready description of ``contract`` for a model with an E x E image embedding."""
    name, S = contract.name, contract.input_size
    L = 4 * embedding_size
    spec: dict[str, Any] = {
        "name": name,
        "spec_version": SPEC_VERSION,
        "input_size": S,
        "embedding_size": embedding_size,
        "low_res_mask_size": L,
        "python_reference": f"medsam.preprocess.Contract({name!r}, {S}).prepare_image",
        "encoder_input": {"shape": [1, 3, S, S], "dtype": "float32", "layout": "NCHW", "channels": "RGB"},
        "to_rgb_uint8": _TO_RGB_UINT8,
    }
    if name == "medsam":
        spec["resize"] = {
            "rule": "square",
            "output_size": [S, S],
            "keeps_aspect_ratio": False,
            "method": "bicubic with anti-aliasing, on the uint8 RGB image",
            "reference": (
                f"skimage.transform.resize(rgb, ({S}, {S}), order=3, preserve_range=True, "
                "mode='constant', anti_aliasing=True).astype(numpy.uint8)"
            ),
            "to_uint8": "truncation toward zero (astype), not rounding",
        }
        spec["normalization"] = {
            "type": "minmax",
            "output_range": [0.0, 1.0],
            "formula": "x = (r - r.min()) / max(r.max() - r.min(), 1e-8), float64 over all three "
            "channels of the resized uint8 image r jointly, then float32",
        }
        spec["padding"] = {"type": "none"}
        spec["prompts"] = {
            "coordinate_transform": f"x_net = x * {S} / W, y_net = y * {S} / H",
        }
        spec["mask"] = {
            "scores": "sigmoid(low_res_logits), then bilinear resize (align_corners=False, "
            "half-pixel centres, no anti-aliasing) to (H, W)",
            "threshold": 0.5,
            "threshold_on": "probability",
            "rule": "mask = bilinear(sigmoid(logits), (H, W)) > 0.5",
        }
    elif name == "sam":
        spec["resize"] = {
            "rule": "longest_side",
            "resized_size": f"(h', w') = (int(H * s + 0.5), int(W * s + 0.5)), s = {S} / max(H, W)",
            "keeps_aspect_ratio": True,
            "method": "bilinear on the uint8 RGB image",
            "reference": "PIL.Image.fromarray(rgb).resize((w', h'), PIL.Image.BILINEAR)",
        }
        spec["normalization"] = {
            "type": "mean_std",
            "input_range": [0, 255],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "formula": "x = (r - mean[c]) / std[c] per RGB channel c, on 0..255 values",
        }
        spec["padding"] = {
            "type": "zeros",
            "where": "bottom and right, to S x S",
            "applied": "after normalisation (padded pixels are 0 in the normalised tensor)",
        }
        spec["prompts"] = {"coordinate_transform": "x_net = x * w' / W, y_net = y * h' / H"}
        spec["mask"] = {
            "scores": f"bilinear resize (align_corners=False) of the logits to {S} x {S}, crop to "
            "[:h', :w'], bilinear resize to (H, W)",
            "threshold": 0.0,
            "threshold_on": "logit",
            "rule": "mask = bilinear(crop(bilinear(logits, (S, S)), h', w'), (H, W)) > 0",
        }
    elif name == "lite":
        spec["resize"] = {
            "rule": "longest_side",
            "resized_size": f"(h', w') = (int(H * s + 0.5), int(W * s + 0.5)), s = {S} / max(H, W)",
            "keeps_aspect_ratio": True,
            "method": "area (box filter) when shrinking, bilinear when enlarging, on the uint8 RGB image",
            "reference": "PIL.Image.fromarray(rgb).resize((w', h'), PIL.Image.BOX if shrinking else "
            "PIL.Image.BILINEAR)",
        }
        spec["normalization"] = {
            "type": "minmax",
            "output_range": [0.0, 1.0],
            "formula": "x = (r - r.min()) / max(r.max() - r.min(), 1e-8), float64 over all three "
            "channels of the resized (unpadded) uint8 image r jointly, then float32",
        }
        spec["padding"] = {
            "type": "zeros",
            "where": "bottom and right, to S x S",
            "applied": "after normalisation",
        }
        spec["prompts"] = {"coordinate_transform": "x_net = x * w' / W, y_net = y * h' / H"}
        spec["mask"] = {
            "scores": f"crop the logits to [:round(h' * {L} / {S}), :round(w' * {L} / {S})], bilinear "
            "resize (align_corners=False) to (H, W), sigmoid",
            "threshold": 0.5,
            "threshold_on": "probability",
            "rule": "mask = sigmoid(bilinear(crop(logits), (H, W))) > 0.5",
        }
    else:  # the SAM2 family's contracts: its models are not exported to ONNX
        raise ValueError(f"no ONNX contract description for {name!r}: ONNX export takes SAM, MedSAM and LiteMedSAM")
    if contract.mask_threshold is not None:  # a model calibrated to another threshold
        standard = spec["mask"]["threshold"]
        spec["mask"]["threshold"] = float(contract.mask_threshold)
        spec["mask"]["rule"] = spec["mask"]["rule"].replace(f"> {standard:g}", f"> {contract.mask_threshold:g}")
    spec["prompts"].update(
        {
            "frame": "pixels, x to the right (column), y down (row); boxes [x0, y0, x1, y1] with "
            "inclusive corners; coordinates are given to the decoder in the network frame",
            "point_labels": {"1": "foreground", "0": "background"},
        }
    )
    return spec


def check_contract_spec(spec: dict[str, Any]) -> Contract:
    """The :class:`Contract` a stored spec describes; ValueError when it is not the package's own.

    The stored spec must equal, field for field, what :func:`contract_spec` writes for that
    contract name and size, so a file whose normalisation was edited (say, ImageNet statistics
    added to a ``medsam`` export) is refused.
    """
    if not isinstance(spec, dict) or spec.get("name") not in CONTRACT_NAMES:
        raise ValueError(f"not a medsam contract spec (name must be one of {CONTRACT_NAMES})")
    try:
        contract = Contract(spec["name"], int(spec["input_size"]))
        threshold = spec["mask"]["threshold"]
        if threshold != contract.standard_threshold:
            contract = Contract(contract.name, contract.input_size, threshold)
        expected = contract_spec(contract, int(spec["embedding_size"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"incomplete contract spec: {exc}") from None
    if spec != expected:
        diff = sorted(k for k in set(spec) | set(expected) if spec.get(k) != expected.get(k))
        raise ValueError(
            f"the {spec['name']!r} contract spec differs from this package's ({', '.join(diff)}): "
            "refusing to preprocess differently from what the export says"
        )
    return contract
