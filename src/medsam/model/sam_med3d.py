"""SAM-Med3D: SAM with native 3D patches and 3D relative positions, a 3D prompt encoder and a 3D
mask decoder, under the parameter names of the released checkpoints (``sam_med3d.pth``,
``sam_med3d_turbo.pth``, both ``{"model_state_dict": ...}``).

Axes: a crop enters as (B, 1, S, S, S) (S = 128 for the released models), indexed (i0, i1, i2)
in the order of the array given (the inference module passes RAS-canonical arrays, as the
published pipeline does); the embedding is (B, 384, E, E, E) with E = S / 16; mask logits are
(B, M, 4E, 4E, 4E). Point prompts are voxel indices (i0, i1, i2) of the network input.

Windowed blocks: the released encoder has 8^3 tokens and 14^3 windows, so every windowed block
attends over one zero-padded 14^3 window. The padding's queries, keys and values are the qkv
bias (a linear layer of zeros), and the padding's outputs are discarded by the published code,
so :meth:`Attention3D.forward_padded_window` computes the same attention with the 512 real
tokens as queries only, 5.4x fewer than the 2744 the window holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConfigRecord, LayerNorm2d, MLPBlock
from .dispatch import scaled_dot_product_attention
from .image_encoder import relative_position_table
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import DecoderOutput


@dataclass(frozen=True)
class SamMed3DConfig(ConfigRecord):
    """Architecture of a SAM-Med3D model and the contract its weights were trained with: crops
    of ``img_size``^3 voxels resampled to ``spacing_mm`` isotropic, z-scored over voxels > 0."""

    name: str = "sam_med3d"
    img_size: int = 128
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    spacing_mm: float = 1.5
    default_contract: str = "sam_med3d"
    family: str = "sam_med3d"
    encoder: str = "vit3d"

    @property
    def embedding_size(self) -> int:
        return self.img_size // self.patch_size


SAM_MED3D_CONFIGS: dict[str, SamMed3DConfig] = {"sam_med3d": SamMed3DConfig()}


def window_partition_3d(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * nWin, window, window, window, C), zero-padding each axis up to a
    multiple of ``window``; also returns the padded size."""
    B, D, H, W, C = x.shape
    pads = [(window - s % window) % window for s in (D, H, W)]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    Dp, Hp, Wp = D + pads[0], H + pads[1], W + pads[2]
    x = x.view(B, Dp // window, window, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, C), (Dp, Hp, Wp)


def window_unpartition_3d(
    windows: torch.Tensor, window: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition_3d`, cropping the padding away."""
    Dp, Hp, Wp = padded
    D, H, W = size
    B = windows.shape[0] // ((Dp // window) * (Hp // window) * (Wp // window))
    x = windows.view(B, Dp // window, Hp // window, Wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, Dp, Hp, Wp, -1)
    return x[:, :D, :H, :W, :]


class Attention3D(nn.Module):
    """Multi-head self-attention over a (B, D, H, W, C) token grid with a decomposed 3D
    relative-position bias (``rel_pos_d``, ``rel_pos_h``, ``rel_pos_w``)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[2] - 1, head_dim))

    def rel_pos_bias(self, q_grid: torch.Tensor, real: tuple[int, int, int]) -> torch.Tensor:
        """Additive bias (B, heads, D*H*W, n^3) of the queries in the corner ``real`` = (D, H, W)
        of a cubic grid of side n, from the queries q_grid (B, heads, n, n, n, hd) of the whole grid.

        The published code adds its three per-axis terms with a broadcast that, for its cubic
        grids, gives query (a, b, c) and key (kd, kh, kw) the bias
        ``q[a,b,c].Rd[a,kw] + q[a,b,kd].Rh[b,kw] + q[a,b,kh].Rw[kh,kw]`` (R: the tables of
        :func:`relative_position_table`), not the separable ``q[a,b,c].(Rd[a,kd] + Rh[b,kh] +
        Rw[c,kw])`` of 2D SAM; the released weights were trained with it, so it is kept.
        """
        B, heads, n = q_grid.shape[:3]
        D, H, W = real
        rd = relative_position_table(n, n, self.rel_pos_d)[:D]  # (D, n, hd)
        rh = relative_position_table(n, n, self.rel_pos_h)[:H]  # (H, n, hd)
        rw = relative_position_table(n, n, self.rel_pos_w)  # (n, n, hd)
        rows = q_grid[:, :, :D, :H]  # (B, heads, D, H, n, hd)
        rel_d = torch.einsum("bnxyzc,xkc->bnxyzk", rows[:, :, :, :, :W], rd)  # (.., D, H, W, n)
        rel_h = torch.einsum("bnxyzc,ykc->bnxyzk", rows, rh)  # (.., D, H, n, n)
        rel_w = torch.einsum("bnxyzc,zkc->bnxyzk", rows, rw)  # (.., D, H, n, n)
        bias = (
            rel_d[:, :, :, :, :, None, None, :]
            + rel_h[:, :, :, :, None, :, None, :]
            + rel_w[:, :, :, :, None, None, :, :]
        )
        return bias.reshape(B, heads, D * H * W, n**3)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ..., C) -> (B, heads, ..., C / heads)."""
        x = x.reshape(*x.shape[:-1], self.num_heads, -1)
        return x.movedim(-2, 1)

    def _attend(self, qkv_grid: torch.Tensor, real: tuple[int, int, int]) -> torch.Tensor:
        """qkv_grid (B, n, n, n, 3C) of a cubic grid -> (B, D, H, W, C) outputs of its corner
        ``real`` = (D, H, W) of queries, attending to all n^3 tokens."""
        B, n = qkv_grid.shape[0], qkv_grid.shape[1]
        D, H, W = real
        q_grid, k, v = (self._heads(t) for t in qkv_grid.chunk(3, dim=-1))  # (B, heads, n, n, n, hd)
        q = q_grid[:, :, :D, :H, :W].reshape(B, self.num_heads, D * H * W, -1)
        k = k.reshape(B, self.num_heads, n**3, -1)
        v = v.reshape(B, self.num_heads, n**3, -1)
        out = scaled_dot_product_attention(q, k, v, self.rel_pos_bias(q_grid, real))
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(B, D, H, W, -1))
        return projected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention among all tokens of a cubic grid x (B, n, n, n, C) -> (B, n, n, n, C)."""
        size = (x.shape[1], x.shape[2], x.shape[3])
        if len(set(size)) != 1:
            raise ValueError(f"SAM-Med3D attends over cubic token grids, not {size}")
        return self._attend(self.qkv(x), size)

    def forward_padded_window(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """x (B, D, H, W, C) with D, H, W <= ``window``: the real tokens' outputs of attention over
        x zero-padded to one ``window``^3 window, where the padding's queries, keys and values
        are the qkv bias (see the module docstring)."""
        B, D, H, W, C = x.shape
        qkv = self.qkv(x)
        bias = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(3 * C)
        padded = bias.expand(B, window, window, window, 3 * C).clone()
        padded[:, :D, :H, :W] = qkv
        return self._attend(padded, (D, H, W))


class Block3D(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 attends globally, else within windows."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: tuple[int, int, int]
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(dim, num_heads, grid if window_size == 0 else (window_size,) * 3)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        window = self.window_size
        size = (y.shape[1], y.shape[2], y.shape[3])
        if window == 0:
            y = self.attn(y)
        elif max(size) <= window:
            y = self.attn.forward_padded_window(y, window)
        else:
            windows, padded = window_partition_3d(y, window)
            y = window_unpartition_3d(self.attn(windows), window, padded, size)
        x = x + y
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches: (B, 1, S, S, S) -> (B, S/p, S/p, S/p, D) (channels last)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches: torch.Tensor = self.proj(x)
        return patches.permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """(B, 1, S, S, S) normalised crops -> (B, prompt_embed_dim, E, E, E) embeddings."""

    def __init__(self, config: SamMed3DConfig) -> None:
        super().__init__()
        self.img_size = config.img_size
        g = config.embedding_size
        self.patch_embed = PatchEmbed3D(config.patch_size, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                0 if i in config.global_attn_indexes else config.window_size,
                (g, g, g),
            )
            for i in range(config.depth)
        )
        out = config.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv3d(config.embed_dim, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv3d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.neck(x.permute(0, 4, 1, 2, 3))
        return out


class SamMed3DModel(nn.Module):
    """Image encoder, prompt encoder and mask decoder of SAM-Med3D under the official names.

    ``contract`` names the preprocessing (``"sam_med3d"``: :mod:`medsam.sam_med3d_inference`).
    """

    preferred_precision: str = "fp32"
    is_untrained_default: bool = False

    def __init__(self, config: SamMed3DConfig, contract: str = "sam_med3d") -> None:
        super().__init__()
        e, s = config.embedding_size, config.img_size
        self.config = config
        self.contract = contract
        self.image_encoder = ImageEncoderViT3D(config)
        self.prompt_encoder = PromptEncoder(
            config.prompt_embed_dim, (e, e, e), (s, s, s), config.mask_in_chans, spatial_dims=3
        )
        self.mask_decoder = MaskDecoder(config.prompt_embed_dim, spatial_dims=3)

    @property
    def input_size(self) -> int:
        """Side of the cubic network input (128 for the released models)."""
        return self.config.img_size

    @property
    def mask_input_size(self) -> int:
        """Side L of the (B, 1, L, L, L) mask prompt and of the low-resolution logits (4E)."""
        return int(self.prompt_encoder.mask_input_size[0])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed_image(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) normalised crops -> (B, 384, E, E, E) embeddings."""
        embedding: torch.Tensor = self.image_encoder(crops)
        return embedding

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor],
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> DecoderOutput:
        """Clicks -> low-resolution logits (B, M, 4E, 4E, 4E) and IoU predictions (B, M).

        Args:
            image_embeddings: (1 or B, 384, E, E, E).
            points: ((B, P, 3) voxel indices (i0, i1, i2) of the crop, (B, P) labels 1 / 0).
            mask_input: (B, 1, 4E, 4E, 4E) logits of the previous step (the published iterative
                inference gives zeros at its first click).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=mask_input)
        logits, iou = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return DecoderOutput(logits=logits, iou=iou)
