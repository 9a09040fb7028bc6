"""SAM2's feature-pyramid neck over the Hiera stages, and the sine position encoding of its maps.

:class:`FpnNeck`: the four stage maps (highest resolution first) -> four ``d_model``-channel maps
of the same sizes. Each stage gets a 1 x 1 lateral convolution (``convs.N.conv``, N counted from
the lowest resolution, as the official checkpoints name them); the levels in
``top_down_levels`` add the next lower-resolution output, upsampled 2x by nearest neighbour.

:func:`sine_position_encoding`: SAM2's ``PositionEmbeddingSine`` (normalised coordinates,
temperature 10000, the y half of the channels first), for a (B, C, H, W) map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Lateral(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Stage maps [(B, C_i, H_i, W_i)], highest resolution first -> [(B, d_model, H_i, W_i)]."""

    def __init__(
        self,
        backbone_channel_list: Sequence[int],
        d_model: int = 256,
        top_down_levels: Sequence[int] = (2, 3),
    ) -> None:
        super().__init__()
        self.backbone_channel_list = list(backbone_channel_list)  # lowest resolution first
        self.convs = nn.ModuleList(_Lateral(c, d_model) for c in self.backbone_channel_list)
        self.top_down_levels = tuple(top_down_levels)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"expected {n + 1} stage maps, got {len(xs)}")
        out: list[torch.Tensor] = [xs[0]] * (n + 1)
        previous: torch.Tensor | None = None
        for i in range(n, -1, -1):  # from the lowest resolution up
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and previous is not None:
                lateral = lateral + F.interpolate(previous.float(), scale_factor=2.0, mode="nearest")
            previous = lateral
            out[i] = lateral
        return out


def sine_position_encoding(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """(B, C, H, W) map -> (B, num_pos_feats, H, W) float32 encoding of its grid positions.

    Rows and columns are numbered 1..H and 1..W, divided by the last (+1e-6) and scaled by 2 pi;
    each half of the channels (y first, then x) holds sin / cos pairs of the coordinate divided
    by ``temperature ** (2 * (j // 2) / half)``, interleaved.
    """
    B, _, H, W = x.shape
    half = num_pos_feats // 2
    scale = 2 * math.pi
    y = torch.arange(1, H + 1, dtype=torch.float32, device=x.device)
    xs = torch.arange(1, W + 1, dtype=torch.float32, device=x.device)
    y = y / (y[-1] + 1e-6) * scale
    xs = xs / (xs[-1] + 1e-6) * scale
    dim_t = torch.arange(half, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)

    def encode(coords: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, half)
        angles = coords[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(H, W, half)
    pos_x = encode(xs)[None, :, :].expand(H, W, half)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos.unsqueeze(0).expand(B, -1, -1, -1)
