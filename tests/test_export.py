"""ONNX export: graphs reproduce PyTorch, the contract travels with the files, int8 stays close.

One ``vit_tiny`` export (through the ``medsam export-onnx`` command, with int8) and one LiteMedSAM
(TinyViT) export serve all tests; about 45 s on 2 cores. Skipped without onnx/onnxscript/onnxruntime
(``pip install 'medsam[export]'``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import medsam
from conftest import smooth_image
from medsam.export import OnnxPredictor, check_contract_spec, contract_spec, export_onnx
from medsam.preprocess import IMAGENET_MEAN, IMAGENET_STD, Contract, get_contract
from medsam.scribbles import Scribble

IMAGE = smooth_image(180, 240, seed=3)
BOXES = np.array([[20, 30, 150, 170], [100, 50, 230, 160], [0, 0, 239, 179]], float)
POINTS = np.array([[[60, 80], [120, 120]]] * 3, float)
LABELS = np.array([[1, 0]] * 3)
# three objects with 1, 2 and 4 points from their strokes: padded with label -1 to 4
SCRIBBLES = [
    [Scribble([[60, 80]])],
    [Scribble([[110, 60], [130, 60]]), Scribble([[200, 150]], positive=False)],
    [Scribble([[10, 10], [40, 10], [40, 40]])],
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_masks_equal_except_ties(ref: medsam.Prediction, got: medsam.Prediction, tol: float = 1e-3):
    """Masks may differ only where the reference score is within ``tol`` of the threshold."""
    assert got.masks.shape == ref.masks.shape
    diff = got.masks != ref.masks
    if not diff.any():
        return
    thr = ref.contract.threshold
    for i in range(len(ref.scores)):
        if diff[i].any():
            scores = ref.score_maps(i)
            scores = scores if ref.masks.ndim == 4 else scores[0]
            assert np.abs(scores[diff[i]] - thr).max() < tol, "masks differ away from the threshold"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded vit_tiny model, saved, then exported by the CLI with --int8."""
    from medsam.cli import onnx as cli_export

    torch.manual_seed(0)
    model = medsam.build_model("vit_tiny").eval()
    root = tmp_path_factory.mktemp("onnx")
    ckpt = medsam.save_model(model, root / "tiny.safetensors")
    parser = argparse.ArgumentParser()
    cli_export.add_parser(parser.add_subparsers())
    args = parser.parse_args(["export-onnx", "--checkpoint", str(ckpt), "-o", str(root / "out"), "--int8"])
    assert args.func(args) == 0
    return model, root / "out"


@pytest.fixture(scope="module")
def tiny_predictors(tiny):
    model, out = tiny
    torch_p = medsam.Predictor(model)
    onnx_p = OnnxPredictor(out, threads=torch.get_num_threads())
    torch_p.set_image(IMAGE)
    onnx_p.set_image(IMAGE)
    return torch_p, onnx_p


def test_files_shapes_and_dynamic_prompt_count(tiny):
    _, out = tiny
    names = sorted(p.name for p in out.iterdir())
    assert names == ["decoder.onnx", "decoder_points.onnx", "encoder.int8.onnx", "encoder.onnx", "medsam_onnx.json"]
    meta = json.loads((out / "medsam_onnx.json").read_text())
    enc = meta["files"]["encoder"]
    assert enc["inputs"][0] == {"name": "image", "shape": [1, 3, 256, 256], "dtype": "tensor(float)"}
    assert enc["outputs"][0]["shape"] == [1, 256, 16, 16]
    dec = meta["files"]["decoder"]
    assert [i["name"] for i in dec["inputs"]] == ["image_embeddings", "boxes", "mask_input", "has_mask_input"]
    assert isinstance(dec["inputs"][1]["shape"][0], str)  # N is dynamic
    assert [o["name"] for o in dec["outputs"]][:2] == ["low_res_logits", "iou_predictions"]
    assert meta["opset"] >= 17 and meta["quantization"]["quantized_files"] == ["encoder_int8"]
    assert max(v for k, v in meta["verification"]["errors"].items() if "int8" not in k) < 1e-4


def test_encoder_and_decoder_graphs_match_pytorch(tiny):
    model, out = tiny
    x, _ = get_contract("medsam", 256).prepare_image(IMAGE)
    with torch.no_grad():
        ref = model.embed_image(x)
    emb = _session(out / "encoder.onnx").run(None, {"image": x.numpy()})[0]
    assert emb.shape == (1, 256, 16, 16)
    assert _rel(emb, ref.numpy()) < 1e-4
    dec = _session(out / "decoder.onnx")
    for n in (1, 3):
        boxes = torch.tensor(BOXES[:n], dtype=torch.float32)
        with torch.no_grad():
            want = model.decode(ref, boxes=boxes)
        logits, iou = dec.run(
            ["low_res_logits", "iou_predictions"],
            {
                "image_embeddings": ref.numpy(),
                "boxes": boxes.numpy(),
                "mask_input": np.zeros((n, 1, 64, 64), np.float32),
                "has_mask_input": np.zeros(1, np.float32),
            },
        )
        assert logits.shape == (n, 1, 64, 64) and iou.shape == (n, 1)
        assert _rel(logits, want.logits.numpy()) < 1e-4
        np.testing.assert_allclose(iou, want.iou.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "prompt",
    [
        dict(boxes=BOXES[:1]),
        dict(boxes=BOXES),
        dict(boxes=BOXES, multimask=True),
        dict(points=POINTS[:1], point_labels=LABELS[:1]),
        dict(boxes=BOXES, points=POINTS, point_labels=LABELS),
        dict(boxes=BOXES, scribbles=SCRIBBLES),
    ],
    ids=["box", "3boxes", "multimask", "points", "boxes+points", "boxes+scribbles (padded points)"],
)
def test_onnx_predictor_matches_predictor(tiny_predictors, prompt):
    torch_p, onnx_p = tiny_predictors
    assert _rel(onnx_p.embedding.numpy(), torch_p.embedding.numpy()) < 1e-4
    ref, got = torch_p.predict(**prompt), onnx_p.predict(**prompt)
    assert type(got) is type(ref) and got.contract == ref.contract and got.geometry == ref.geometry
    assert got.low_res_logits.shape == ref.low_res_logits.shape and got.low_res_logits.dtype == np.float32
    assert _rel(got.low_res_logits, ref.low_res_logits) < 1e-4
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-5)
    _assert_masks_equal_except_ties(ref, got)


def test_mask_input_and_label_map(tiny_predictors):
    torch_p, onnx_p = tiny_predictors
    first = torch_p.predict(boxes=BOXES)
    for kwargs in (dict(boxes=BOXES, mask_input=first.low_res_logits), dict(mask_input=first.low_res_logits[:1])):
        ref, got = torch_p.predict(**kwargs), onnx_p.predict(**kwargs)
        assert _rel(got.low_res_logits, ref.low_res_logits) < 1e-4
        _assert_masks_equal_except_ties(ref, got)
    got = onnx_p.predict(boxes=BOXES)
    labels = medsam.masks_to_label_map(got)
    assert labels.shape == IMAGE.shape and labels.max() <= 3


def test_prompt_errors_are_the_predictors(tiny_predictors):
    from medsam.predictor import PromptError

    _, onnx_p = tiny_predictors
    with pytest.raises(PromptError, match="outside"):
        onnx_p.predict(boxes=[[0, 0, 500, 50]])
    with pytest.raises(PromptError, match="at least one prompt"):
        onnx_p.predict()


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}/{k}", k, v
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}/{i}")


def test_medsam_contract_has_no_imagenet_statistics_anywhere(tiny):
    import onnx

    _, out = tiny
    meta = json.loads((out / "medsam_onnx.json").read_text())
    spec = meta["contract"]
    assert spec["name"] == "medsam" and spec["input_size"] == 256
    assert spec["resize"]["rule"] == "square" and spec["resize"]["keeps_aspect_ratio"] is False
    assert spec["normalization"]["type"] == "minmax" and spec["normalization"]["output_range"] == [0.0, 1.0]
    assert spec["mask"]["threshold"] == 0.5 and spec["mask"]["threshold_on"] == "probability"
    keys = {k.lower() for _, k, _ in _walk(meta)}
    assert not keys & {"mean", "std", "pixel_mean", "pixel_std"}
    texts = [(out / "medsam_onnx.json").read_text().lower()]
    for name in ("encoder.onnx", "decoder.onnx", "decoder_points.onnx", "encoder.int8.onnx"):
        props = {p.key: p.value for p in onnx.load(str(out / name), load_external_data=False).metadata_props}
        assert json.loads(props["medsam_contract"]) == spec
        texts.append(json.dumps(props).lower())
    for text in texts:
        assert "imagenet" not in text
        for value in (*IMAGENET_MEAN, *IMAGENET_STD):
            assert repr(value) not in text


@pytest.mark.parametrize("name", ["medsam", "sam", "lite"])
def test_contract_spec_describes_the_package_contract(name):
    """Following the JSON's numbers by hand gives what Contract.prepare_image gives."""
    spec = contract_spec(Contract(name, 64), 16)
    assert json.loads(json.dumps(spec)) == spec and check_contract_spec(json.loads(json.dumps(spec))).name == name
    image = smooth_image(50, 70, seed=5, channels=3)
    x, geom = Contract(name, 64).prepare_image(image)
    if name == "medsam":
        from skimage.transform import resize

        r = resize(image, (64, 64), order=3, preserve_range=True, mode="constant", anti_aliasing=True)
        r = r.astype(np.uint8).astype(np.float64)
        lo, hi = spec["normalization"]["output_range"]
        want = (r - r.min()) / max(r.max() - r.min(), 1e-8) * (hi - lo) + lo
        assert "mean" not in spec["normalization"] and "std" not in spec["normalization"]
    else:
        from PIL import Image

        h, w = geom.resized_size
        s = 64 / max(image.shape[:2])
        assert (h, w) == (int(image.shape[0] * s + 0.5), int(image.shape[1] * s + 0.5))
        filt = Image.BILINEAR if name == "sam" else Image.BOX
        r = np.asarray(Image.fromarray(image).resize((w, h), filt)).astype(np.float64)
        if name == "sam":
            assert spec["normalization"]["type"] == "mean_std"
            want = (r - np.array(spec["normalization"]["mean"])) / np.array(spec["normalization"]["std"])
        else:
            assert spec["normalization"]["type"] == "minmax"
            want = (r - r.min()) / max(r.max() - r.min(), 1e-8)
        want = np.pad(want, ((0, 64 - h), (0, 64 - w), (0, 0)))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), want, rtol=1e-5, atol=1e-5)
    assert spec["mask"]["threshold"] == Contract(name, 64).threshold


def test_edited_contract_is_refused_and_sam_contract_runs(tiny, tmp_path):
    import shutil

    model, out = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta_path = copy / "medsam_onnx.json"
    meta = json.loads(meta_path.read_text())
    meta["contract"]["normalization"]["mean"] = list(IMAGENET_MEAN)  # the classic wrong export
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs"):
        OnnxPredictor(copy)
    # A consistent spec of another contract is honoured: the same weights under SAM's contract.
    meta["contract"] = contract_spec(Contract("sam", 256), 16)
    meta_path.write_text(json.dumps(meta))
    onnx_p = OnnxPredictor(copy)
    torch_p = medsam.Predictor(model, contract="sam")
    onnx_p.set_image(IMAGE)
    torch_p.set_image(IMAGE)
    ref, got = torch_p.predict(boxes=BOXES), onnx_p.predict(boxes=BOXES)
    assert got.contract.name == "sam" and got.geometry == ref.geometry
    assert _rel(got.low_res_logits, ref.low_res_logits) < 1e-4
    _assert_masks_equal_except_ties(ref, got)


def test_int8_encoder_stays_close(tiny, tiny_predictors):
    _, out = tiny
    torch_p, onnx_p = tiny_predictors
    q = OnnxPredictor(out, precision="int8", threads=torch.get_num_threads())
    assert q.files["encoder"].name == "encoder.int8.onnx" and q.files["decoder"].name == "decoder.onnx"
    assert (out / "encoder.int8.onnx").stat().st_size < 0.8 * (out / "encoder.onnx").stat().st_size
    q.set_image(IMAGE)
    assert _rel(q.embedding.numpy(), torch_p.embedding.numpy()) < 0.05
    ref, got = onnx_p.predict(boxes=BOXES), q.predict(boxes=BOXES)
    assert _rel(got.low_res_logits, ref.low_res_logits) < 0.1
    inter = (got.masks & ref.masks).sum(axis=(1, 2))
    union = (got.masks | ref.masks).sum(axis=(1, 2))
    assert np.all(inter / np.maximum(union, 1) > 0.9)


def test_lite_tinyvit_export(tmp_path):
    torch.manual_seed(0)
    model = medsam.build_model("lite").eval()
    result = export_onnx(model, tmp_path / "lite", points_decoder=False, verify=False)
    assert result.decoder_points is None and result.encoder_int8 is None
    meta = json.loads(result.metadata.read_text())
    assert meta["contract"]["name"] == "lite" and meta["contract"]["resize"]["rule"] == "longest_side"
    assert meta["files"]["encoder"]["outputs"][0]["shape"] == [1, 256, 64, 64]
    torch_p, onnx_p = medsam.Predictor(model), OnnxPredictor(tmp_path / "lite", threads=torch.get_num_threads())
    torch_p.set_image(IMAGE)
    onnx_p.set_image(IMAGE)
    assert _rel(onnx_p.embedding.numpy(), torch_p.embedding.numpy()) < 1e-4
    ref, got = torch_p.predict(boxes=BOXES), onnx_p.predict(boxes=BOXES)
    assert _rel(got.low_res_logits, ref.low_res_logits) < 1e-4
    _assert_masks_equal_except_ties(ref, got)
    from medsam.predictor import PromptError

    with pytest.raises(PromptError, match="decoder_points"):
        onnx_p.predict(points=POINTS[:1], point_labels=LABELS[:1])


def test_bad_quantize_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(medsam.build_model("vit_tiny"), tmp_path, quantize="int4")
    assert not any(tmp_path.iterdir())


def test_onnx_predictor_zooms_small_boxes_as_the_predictor(tiny, tiny_predictors):
    """A 256 px export follows the same recipe: a small box on its crop, through the export's own
    sessions (fp32 and int8), with the masks of the PyTorch predictor's zoom."""
    _, out = tiny
    torch_p, onnx_p = tiny_predictors
    small = np.array([[50, 60, 62, 71], [20, 30, 150, 170]], float)
    ref, got = torch_p.predict(boxes=small), onnx_p.predict(boxes=small)
    assert ref.zoomed.tolist() == got.zoomed.tolist() == [True, False]
    np.testing.assert_array_equal(got.windows, ref.windows)
    assert _rel(got.low_res_logits, ref.low_res_logits) < 1e-4
    _assert_masks_equal_except_ties(ref, got)
    q = OnnxPredictor(out, precision="int8", threads=torch.get_num_threads())
    q.set_image(IMAGE)
    zoomed = q.predict(boxes=small[:1])
    assert zoomed.zoomed.tolist() == [True] and q.crop_predictor is not None
    assert q.crop_predictor.model is q.model  # the crops go through the int8 sessions
    inter, union = (zoomed.masks & ref.masks[:1]).sum(), (zoomed.masks | ref.masks[:1]).sum()
    assert inter / max(union, 1) > 0.8
    assert OnnxPredictor(out, zoom=False).zoom is None
