"""The CPU inference paths (tiled TinyViT, blocked mask decoder, cached positional encoding) give
the results of the module-by-module forward.

Both paths run on the same modules; the module-by-module one is selected by switching the CPU
kernels off (``medsam.model.dispatch.cpu_kernels(False)``). tests/test_model_paths.py compares
each path with the independent oracles at full size.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import medsam
from medsam.model import _decoder_inference, _onednn, _tiny_vit_inference, _workspace, dispatch, mask_decoder
from medsam.model.tiny_vit import TinyViT
from test_tiny_vit import random_state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5, msg: str = "") -> None:
    """Float-rounding agreement: every element within ``tol`` of the largest magnitude, and the
    relative L2 error below ``tol / 5``."""
    assert a.shape == b.shape, msg
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * scale, msg
    assert _rel(a, b) < tol / 5, msg


@pytest.fixture
def plain_encoder():
    """Call inside a test to run the models module by module (the CPU kernels switched off until
    the test ends)."""
    previous = dispatch.cpu_kernels_enabled()

    def switch(on: bool) -> None:
        dispatch.set_cpu_kernels(not on)

    yield switch
    dispatch.set_cpu_kernels(previous)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = TinyViT().eval()
    model.load_state_dict(random_state(model, seed=7))
    return model


@pytest.mark.parametrize("shape", [(1, 3, 256, 256), (2, 3, 96, 80), (1, 3, 40, 72)])
def test_tiled_tinyvit_matches_module_forward(encoder, plain_encoder, shape):
    # 96 x 80 and 40 x 72: padded windows in every stage, odd and non-square maps, batch 2.
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _tiny_vit_inference.applicable(encoder, x)
        fast = encoder(x)
        stages = encoder.forward_stages(x)
    plain_encoder(True)
    with torch.inference_mode():
        assert not _tiny_vit_inference.applicable(encoder, x)
        plain = encoder(x)
        plain_stages = encoder.forward_stages(x)
    assert fast.shape == plain.shape and fast.is_contiguous()
    _assert_close(fast, plain)
    _assert_close(stages, plain_stages)


def test_tiled_tinyvit_small_tiles_and_unfused_depthwise(encoder, plain_encoder, monkeypatch):
    """Tiles of one or two rows (many tile borders) and the fallback without oneDNN's fused GELU."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        default = encoder(x)
    monkeypatch.setattr(_tiny_vit_inference, "TILE_BYTES", 1)
    monkeypatch.setattr(
        _onednn,
        "_probed",
        {(k, d): False for k in ("depthwise_gelu", "linear_gelu") for d in (torch.float32, torch.bfloat16)},
    )
    with torch.inference_mode():
        small = encoder(x)
    plain_encoder(True)
    with torch.inference_mode():
        plain = encoder(x)
    _assert_close(small, plain)
    _assert_close(default, plain)


def test_tiled_tinyvit_results_are_fresh_and_modes_mix(encoder):
    """Results never alias the reused buffers; inference mode and no_grad alternate freely."""
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.inference_mode():
        y1, s1 = encoder(x1), encoder.forward_stages(x1)
        keep_y1, keep_s1 = y1.clone(), s1.clone()
        encoder(x2), encoder.forward_stages(x2)
    assert torch.equal(y1, keep_y1) and torch.equal(s1, keep_s1)
    with torch.no_grad():
        assert _tiny_vit_inference.applicable(encoder, x1)
        torch.testing.assert_close(encoder(x1), keep_y1, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x1), keep_y1, rtol=1e-6, atol=1e-6)


def test_fast_path_gate(encoder):
    x = torch.rand(1, 3, 32, 32)
    assert not _tiny_vit_inference.applicable(encoder, x)  # autograd on
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not _tiny_vit_inference.applicable(encoder, x)
        encoder.train()
        try:
            assert not _tiny_vit_inference.applicable(encoder, x)
        finally:
            encoder.eval()
        assert _tiny_vit_inference.applicable(encoder, x)


# ------------------------------------------------------------------ decoder
@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return medsam.build_model("vit_tiny").eval()


def _decode(model, fast: bool, **kw):
    with dispatch.cpu_kernels(fast), torch.inference_mode():
        out = model.decode(kw.pop("emb"), **kw)
    return out.logits, out.iou


def _prompt_cases(E: int, S: int, B: int = 5):
    g = torch.Generator().manual_seed(4)
    boxes = torch.rand(B, 4, generator=g) * S / 2
    boxes[:, 2:] += boxes[:, :2]
    pts = (torch.rand(B, 3, 2, generator=g) * S, torch.randint(0, 2, (B, 3), generator=g))
    masks = torch.randn(B, 1, 4 * E, 4 * E, generator=g)
    emb = torch.randn(1, 256, E, E, generator=g)
    return {
        "one box": dict(emb=emb, boxes=boxes[:1]),
        "boxes": dict(emb=emb, boxes=boxes),
        "points": dict(emb=emb, points=pts),
        "box+points": dict(emb=emb, boxes=boxes, points=pts),
        "box+mask": dict(emb=emb, boxes=boxes, mask_input=masks),
        "multimask": dict(emb=emb, boxes=boxes, multimask_output=True),
        "one embedding per prompt": dict(emb=torch.randn(B, 256, E, E, generator=g), boxes=boxes),
    }


@pytest.mark.parametrize("block, group, upscale", [(1024, 2, 1024), (100, 2, 1024), (100, 1, 40)])
def test_blocked_decoder_matches_module_forward(sam, monkeypatch, block, group, upscale):
    """block 100: uneven token blocks; 5 prompts in groups of 2 (2, 2, 1) or 1 (every group a
    single prompt sharing the image tokens); upscale 40: the output upscaling in several row
    blocks."""

    def patch() -> None:
        monkeypatch.setattr(_decoder_inference, "BLOCK_TOKENS", block)
        monkeypatch.setattr(_decoder_inference, "UPSCALE_TOKENS", upscale)
        monkeypatch.setattr(mask_decoder, "_PROMPTS_PER_GROUP", group)

    E = sam.prompt_encoder.image_embedding_size[0]
    for name, case in _prompt_cases(E, sam.input_size).items():
        patch()
        fast = _decode(sam, True, **dict(case))
        patch()
        plain = _decode(sam, False, **dict(case))
        _assert_close(fast[0], plain[0], msg=name)
        torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-6, msg=name)


def test_predict_masks_selects_mask_tokens(sam):
    """forward(multimask) equals the matching tokens of predict_masks (all four)."""
    E = sam.prompt_encoder.image_embedding_size[0]
    case = _prompt_cases(E, sam.input_size)["boxes"]
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=case["boxes"], masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        all_masks, all_iou = sam.mask_decoder.predict_masks(case["emb"], pe, sparse, dense)
        for multi, sel in ((False, slice(0, 1)), (True, slice(1, None))):
            masks, iou = sam.mask_decoder(case["emb"], pe, sparse, dense, multi)
            torch.testing.assert_close(masks, all_masks[:, sel], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(iou, all_iou[:, sel], rtol=1e-5, atol=1e-6)


def test_training_forward_reaches_every_hypernetwork(sam):
    """With autograd on, all four hypernetwork MLPs take part (zero gradients for the unused
    ones), so optimisers with weight decay still update them, as in the published training."""
    E = sam.prompt_encoder.image_embedding_size[0]
    case = _prompt_cases(E, sam.input_size)["boxes"]
    sam.zero_grad(set_to_none=True)
    sparse, dense = sam.prompt_encoder(points=None, boxes=case["boxes"], masks=None)
    masks, iou = sam.mask_decoder(case["emb"], sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert masks.shape[1] == 1
    (masks.sum() + iou.sum()).backward()
    grads = [mlp.layers[0].weight.grad for mlp in sam.mask_decoder.output_hypernetworks_mlps]
    assert all(g is not None for g in grads)
    assert float(grads[0].abs().sum()) > 0 and all(float(g.abs().sum()) == 0 for g in grads[1:])
    sam.zero_grad(set_to_none=True)


def test_tinyvit_batchnorm_in_training_mode_takes_the_plain_forward(encoder):
    """A BatchNorm left in training mode (or without running statistics) cannot be folded."""
    x = torch.rand(1, 3, 32, 32)
    bn = next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.inference_mode():
        assert _tiny_vit_inference.applicable(encoder, x)
        bn.train()
        try:
            assert not _tiny_vit_inference.applicable(encoder, x)
        finally:
            bn.eval()


def test_scratch_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(_workspace, "MAX_TOTAL_KEPT_BYTES", 64)
    x = torch.empty(1)
    with _workspace.scratch() as a:
        a.buffer("a", (8,), x)  # 32 bytes
        a.buffer("b", (8,), x)  # 64 bytes kept
        a.buffer("c", (4,), x)  # past the cap: the set is emptied and refilled
        assert sum(t.numel() * t.element_size() for t in a._store.values()) <= 64
    _workspace.clear()


def test_scratch_is_shared_by_one_call_at_a_time():
    x = torch.empty(1)
    with _workspace.scratch() as a:
        kept = a.buffer("t", (4,), x)
        with _workspace.scratch() as b:  # in use: a private set
            assert b.buffer("t", (4,), x).data_ptr() != kept.data_ptr()
    with _workspace.scratch() as c:  # free again: the kept buffer
        assert c.buffer("t", (2, 2), x).data_ptr() == kept.data_ptr()
        with torch.inference_mode():  # separate buffers per mode
            assert c.buffer("t", (4,), x).data_ptr() != kept.data_ptr()
    _workspace.clear()


def test_decoder_threads_do_not_share_buffers(sam):
    E = sam.prompt_encoder.image_embedding_size[0]
    cases = [_prompt_cases(E, sam.input_size, B=3)[k] for k in ("boxes", "box+mask")]
    with torch.inference_mode():
        expected = [sam.decode(c["emb"], boxes=c["boxes"], mask_input=c.get("mask_input")).logits for c in cases]
    results: dict[int, list] = {0: [], 1: []}

    def work(i: int) -> None:
        c = cases[i]
        with torch.inference_mode():
            for _ in range(20):
                results[i].append(sam.decode(c["emb"], boxes=c["boxes"], mask_input=c.get("mask_input")).logits)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(results[i]) == 20
        for got in results[i]:
            torch.testing.assert_close(got, expected[i], rtol=1e-5, atol=1e-6)


def test_dense_pe_cache_follows_the_weights(sam):
    pe_mod = sam.prompt_encoder
    fresh = lambda: pe_mod.pe_layer(pe_mod.image_embedding_size).unsqueeze(0)
    with torch.inference_mode():
        a = pe_mod.get_dense_pe()
        assert pe_mod.get_dense_pe() is a  # cached
        torch.testing.assert_close(a, fresh(), rtol=0, atol=0)
    state = {k: v.clone() for k, v in pe_mod.state_dict().items()}
    try:
        gauss = "pe_layer.positional_encoding_gaussian_matrix"
        pe_mod.load_state_dict({**state, gauss: state[gauss] * 2})
        with torch.inference_mode():
            b = pe_mod.get_dense_pe()
            torch.testing.assert_close(b, fresh(), rtol=0, atol=0)
        assert not torch.equal(a, b)
        c = pe_mod.get_dense_pe()  # autograd on: computed, never cached
        assert c is not b and torch.equal(c, b)
    finally:
        pe_mod.load_state_dict(state)


def test_predictor_fast_paths_equal_plain():
    """End to end on LiteMedSAM (random weights): embedding, logits and masks."""
    from conftest import smooth_image

    torch.manual_seed(0)
    model = medsam.build_model("lite").eval()
    image = smooth_image(120, 90, seed=5)
    boxes = np.array([[10, 10, 60, 50], [30, 40, 85, 110], [0, 0, 89, 119]])
    p = medsam.Predictor(model)
    p.set_image(image)
    fast = p.predict(boxes=boxes)
    fast_emb = p.embedding.clone()
    with dispatch.cpu_kernels(False):
        p.set_image(image)
        plain = p.predict(boxes=boxes)
    assert _rel(fast_emb, p.embedding) < 1e-5
    np.testing.assert_allclose(fast.low_res_logits, plain.low_res_logits, rtol=1e-4, atol=1e-4)
    assert (fast.masks != plain.masks).mean() < 1e-4


# ------------------------------------------------------------------ ViT encoder
@pytest.mark.parametrize(
    "window, global_index, score_elements, batch, qkv_bias",
    [
        (5, 1, 1 << 22, 2, True),  # 14 x 14 grid: windows padded to 15 x 15; a head's windows at once
        (7, 1, 1 << 22, 1, True),  # windows tile the grid exactly
        (14, 0, 1 << 22, 1, True),  # 16 x 16 grid: a 2-row partial window in each direction
        (5, 2, 3000, 2, True),  # score buffer of a few grid rows: the per-row-block global path
        # (and the MLP's hidden layer in blocks of 50 tokens; windows in groups of 4 of the 18)
        (5, 1, 1 << 22, 1, False),  # no qkv bias: the padding projects to zeros
        # relative-position terms by one product per grid row, and P @ V by torch.mm (no oneDNN)
        (5, 2, 3000, 2, "per-row"),
    ],
)
def test_vit_cpu_inference_matches_module_forward(monkeypatch, window, global_index, score_elements, batch, qkv_bias):
    """The fp32 CPU inference path of the ViT blocks (qkv of real tokens only with the padding
    filled by the bias, attention with the relative-position bias accumulated in a score buffer,
    one-copy unpartition) equals the module-by-module forward (SDPA with the bias as a mask)."""
    from medsam.model import image_encoder
    from medsam.model.image_encoder import ImageEncoderViT

    img = 256 if window == 14 else 224
    torch.manual_seed(0)
    enc = ImageEncoderViT(
        img_size=img,
        depth=3,
        embed_dim=96,
        num_heads=3,
        window_size=window,
        global_attn_indexes=(global_index,),
        out_chans=32,
        qkv_bias=qkv_bias,
    ).eval()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.05)
    monkeypatch.setattr(image_encoder, "_CPU_SCORE_ELEMENTS", score_elements)
    if score_elements < 1 << 22:
        monkeypatch.setattr(image_encoder, "_CPU_MLP_HIDDEN_BYTES", 4 * 384 * 50)
    if qkv_bias == "per-row":  # as at 1024 px, where grids are larger than the table threshold
        monkeypatch.setattr(image_encoder, "_REL_POS_TABLE_MAX_TOKENS", 0)
        monkeypatch.setattr(_onednn, "_probed", {("linear", torch.float32): False})
        qkv_bias = True
    x = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        fast = enc(x)
        with dispatch.cpu_kernels(False):
            plain = enc(x)
    _assert_close(fast, plain)
    with torch.enable_grad():  # autograd: the module-by-module path, same numbers
        _assert_close(enc(x).detach(), plain)


@pytest.mark.parametrize("limit", [1, 3 * 12096, 1 << 24])  # 12096 bias elements per grid row
def test_vit_sdpa_attention_chunks_agree(monkeypatch, limit):
    """The module-by-module attention (SDPA with the bias as a mask, used off the CPU fast path:
    autograd, autocast, GPUs) gives the same result for any chunking of the query rows: one
    grid row per chunk, 3 rows per chunk (3, 3, 3, 3, 2), everything at once."""
    from medsam.model import image_encoder
    from medsam.model.image_encoder import Attention

    torch.manual_seed(0)
    attn = Attention(96, num_heads=3, input_size=(14, 12)).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 14, 12, 96)
    with torch.inference_mode():
        whole = attn(x)  # 2 x 3 heads x 168 x 168 bias elements: one chunk
        monkeypatch.setattr(image_encoder, "_MAX_BIAS_ELEMENTS", limit)
        chunked = attn(x)
    _assert_close(chunked, whole)
    with torch.enable_grad():  # the autograd branch of the bias sum, chunked too
        _assert_close(attn(x).detach(), whole)


# ----------------------------------------------------------------------------- bfloat16
def test_bf16_tinyvit_tiled_path_matches_its_module_forward(encoder, plain_encoder):
    """The bfloat16 copy runs the tiled path; it equals the same copy run module by module (both
    in bfloat16, so within bfloat16 rounding), and stays near the float32 encoder."""
    from medsam.model.sam import MedSAMModel

    holder = MedSAMModel.__new__(MedSAMModel)
    torch.nn.Module.__init__(holder)
    holder.image_encoder = encoder
    low = MedSAMModel.encoder_in(holder, torch.bfloat16)
    assert {p.dtype for n, p in low.named_parameters() if ".bn." not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in low.named_parameters() if ".bn." in n} == {torch.float32}
    x = torch.randn(1, 3, 96, 80)
    with torch.inference_mode():
        fast = low(x.to(torch.bfloat16)).float()
        plain_encoder(True)
        slow = low(x.to(torch.bfloat16)).float()
        plain_encoder(False)
        full = encoder(x)
    assert _rel(fast, slow) < 0.02
    assert _rel(fast, full) < 0.05
    assert MedSAMModel.encoder_in(holder, torch.bfloat16) is low  # kept
    with torch.no_grad():
        next(encoder.parameters()).mul_(1.0)  # an in-place change of a weight: made again
    assert MedSAMModel.encoder_in(holder, torch.bfloat16) is not low


def test_predictor_precision_default_and_auto(monkeypatch):
    import medsam.predictor as pr

    torch.manual_seed(0)
    model = medsam.build_model("vit_tiny").eval()
    assert medsam.Predictor(model).precision == "fp32"  # a model loaded by name: float32
    model.preferred_precision = "auto"  # what the embedded default model carries
    monkeypatch.setattr(pr, "native_bf16", lambda device: True)
    assert medsam.Predictor(model).precision == "bf16"
    assert medsam.Predictor(model, precision="fp32").precision == "fp32"
    monkeypatch.setattr(pr, "native_bf16", lambda device: False)
    assert medsam.Predictor(model).precision == "fp32"
    with pytest.raises(ValueError):
        medsam.Predictor(model, precision="fp16")


def test_embedded_default_prefers_auto_and_bf16_keys_its_embeddings_apart():
    from medsam.embedding_cache import embedding_id

    model = medsam.load_model(device="cpu")
    assert getattr(model, "preferred_precision", None) == "auto"
    fp32, bf16 = medsam.Predictor(model, precision="fp32"), medsam.Predictor(model, precision="bf16")
    assert embedding_id(bf16) == embedding_id(fp32) + "+bf16"
    image = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    fp32.set_image(image)
    bf16.set_image(image)
    assert bf16.embedding.dtype == torch.float32
    assert _rel(bf16.embedding, fp32.embedding) < 0.15
    box = np.array([[10, 10, 60, 50]], float)
    agree = (fp32.predict(boxes=box).masks == bf16.predict(boxes=box).masks).mean()
    assert agree > 0.98
