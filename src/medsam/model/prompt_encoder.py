"""SAM's prompt encoder: points, boxes and low-resolution masks to prompt embeddings.

Coordinates given to this module are in the model's input frame (pixels of the S x S network
input, x to the right, y down), already transformed by the preprocessing contract.

Outputs:
    sparse: (B, P, D) one token per point (plus a padding token when no box is given) and two per box.
    dense:  (B, D, E, E) mask embedding, or the learned "no mask" embedding broadcast.
with D = ``embed_dim`` (256) and E the image-embedding size (64 for the official weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d
from .dispatch import eager_cpu_inference


def box_corner_points(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) or (B, 1, 4) boxes [x0, y0, x1, y1] -> their corners as labelled points: coordinates
    (B, 2, 2) and labels (B, 2) = 2 (top-left), 3 (bottom-right), as SAM encodes boxes."""
    corners = boxes.reshape(-1, 2, 2)
    labels = torch.tensor([2, 3], device=boxes.device).expand(corners.shape[0], 2)
    return corners, labels


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding (``positional_encoding_gaussian_matrix``, 2 x D/2)."""

    def __init__(self, num_pos_feats: int = 128, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], shape (..., 2) as (x, y) -> (..., D)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid -> (D, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode (B, N, 2) pixel coordinates (x, y) of an image of size (H, W) -> (B, N, D)."""
        coords = coords.clone().float()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self._encode(coords)


class PositionEmbeddingRandom3D(nn.Module):
    """SAM-Med3D's random-Fourier encoding (``positional_encoding_gaussian_matrix``, 3 x D/3):
    ``[sin, cos, sin]`` of the projected coordinates, as the released models were trained."""

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], shape (..., 3) -> (..., D)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (S0, S1, S2) grid -> (D, S0, S1, S2). As in the
        published code, the first coordinate runs along axis 1 (divided by S0) and the second
        along axis 0 (divided by S1); equal for the cubic grids of the released models."""
        s0, s1, s2 = size
        device = self.positional_encoding_gaussian_matrix.device
        a0 = (torch.arange(s0, device=device, dtype=torch.float32) + 0.5) / s1
        a1 = (torch.arange(s1, device=device, dtype=torch.float32) + 0.5) / s0
        a2 = (torch.arange(s2, device=device, dtype=torch.float32) + 0.5) / s2
        g0, g1, g2 = torch.meshgrid(a0, a1, a2, indexing="ij")
        return self._encode(torch.stack([g1, g0, g2], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, ...]) -> torch.Tensor:
        """Encode (B, N, 3) voxel coordinates (i0, i1, i2) of a volume of size (S0, S1, S2)."""
        coords = coords.clone().float()
        for axis in range(3):
            coords[:, :, axis] = coords[:, :, axis] / image_size[axis]
        return self._encode(coords)


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for the mask decoder.

    ``spatial_dims=3`` builds SAM-Med3D's prompt encoder: points (B, N, 3) as voxel indices
    (i0, i1, i2), a D/3-feature ``[sin, cos, sin]`` encoding, 3D mask downscaling, and only the
    two point embeddings (negative, positive) that its released checkpoints hold: no boxes.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, ...] = (64, 64),
        input_image_size: tuple[int, ...] = (1024, 1024),
        mask_in_chans: int = 16,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3) or len(image_embedding_size) != spatial_dims:
            raise ValueError(f"a {spatial_dims}-D prompt encoder with a {len(image_embedding_size)}-D embedding")
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.spatial_dims = spatial_dims
        self.pe_layer: PositionEmbeddingRandom | PositionEmbeddingRandom3D
        if spatial_dims == 2:
            self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        else:
            self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right (2D only).
        n_point_embeddings = 4 if spatial_dims == 2 else 2
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(n_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * e for e in image_embedding_size)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.mask_downscaling = nn.Sequential(
            conv(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            conv(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            conv(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, D, E, E).

        At eager CPU inference (see :func:`medsam.model.dispatch.eager_cpu_inference`) the tensor
        is computed once and then reused until the Gaussian matrix changes (loaded weights,
        another device or dtype): treat it as read-only.
        """
        gauss = self.pe_layer.positional_encoding_gaussian_matrix
        if gauss.is_inference() or not eager_cpu_inference(gauss):
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        size = tuple(self.image_embedding_size)
        cached = self.__dict__.get("_dense_pe_cache")  # (matrix, its version, size, encoding)
        if cached is not None and cached[0] is gauss and cached[1:3] == (gauss._version, size):
            return cached[3]
        pe = self.pe_layer(size).unsqueeze(0)
        self.__dict__["_dense_pe_cache"] = (gauss, gauss._version, size, pe)
        return pe

    def embed_labelled_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """SAM's point tokens: (B, N, 2) pixel coordinates (x, y) of the network input with (B, N)
        labels 1 = foreground, 0 = background, 2 / 3 = a box's top-left / bottom-right corner,
        -1 = padding (not a point) -> (B, N, D). The one encoding of every sparse prompt (boxes
        are their two corners; the ONNX point decoder takes prompts packed this way)."""
        emb = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # pixel centres
        labels = labels.unsqueeze(-1)
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        for k, table in enumerate(self.point_embeddings):
            emb = emb + torch.where(labels == k, table.weight, 0.0)
        return emb

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:  # no box: one padding point, as SAM
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, points.shape[2])], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        return self.embed_labelled_points(points, labels)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims != 2:
            raise ValueError("SAM-Med3D's prompt encoder has no box embeddings: give points")
        return self.embed_labelled_points(*box_corner_points(boxes))

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
        points: ((B, N, 2) coordinates (x, y), (B, N) labels 1 = foreground, 0 = background).
        boxes: (B, 4) or (B, 1, 4) boxes [x0, y0, x1, y1].
        masks: (B, 1, 4E, 4E) low-resolution mask logits.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty((bs, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            grid = tuple(self.image_embedding_size)
            dense = weight.reshape(1, -1, *(1,) * len(grid)).expand(bs, -1, *grid)
        return sparse, dense
