"""SAM's two-way transformer: prompt tokens attend to image tokens and back.

Shapes: image embedding (B, C, h, w), its positional encoding (B or 1, C, h, w), prompt tokens
(B, T, C). Returns updated tokens (B, T, C) and updated image tokens (B, h*w, C).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MLPBlock
from .dispatch import scaled_dot_product_attention


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of the internal dimension."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        out = scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


def token_queries(attn: Attention, q_tok: torch.Tensor) -> torch.Tensor:
    """Query side of :func:`attend_tokens_to_image`: (B, T, C) tokens -> (B, T*heads, C) rows
    (t, head) of ``W_k,h^T q_th / sqrt(d)``, to be dotted with image tokens directly."""
    B, T, C = q_tok.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    q = attn.q_proj(q_tok).reshape(B, T, h, d)
    q_tilde = torch.einsum("bthd,hdc->bthc", q, attn.k_proj.weight.reshape(h, d, C)) * d**-0.5
    return q_tilde.reshape(B, T * h, C)


def token_output(attn: Attention, u: torch.Tensor, T: int) -> torch.Tensor:
    """Output side of :func:`attend_tokens_to_image`: the attention-weighted image tokens
    u (B, T*heads, C) -> (B, T, C) through the value and output projections."""
    B, _, C = u.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    out = torch.einsum("bthc,hdc->bthd", u.reshape(B, T, h, C), attn.v_proj.weight.reshape(h, d, C))
    out = out + attn.v_proj.bias.reshape(h, d)
    return attn.out_proj(out.reshape(B, T, h * d))


def attend_tokens_to_image(
    attn: Attention, q_tok: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor
) -> torch.Tensor:
    """``attn(q_tok, k_img, v_img)`` for few queries (prompt tokens) over many keys (image).

    Mathematically identical to :meth:`Attention.forward`, but the key and value projections
    are moved to the query side: scores = (W_k^T q) . k and output = W_v (sum_j p_j v_j) + b_v
    (the key bias adds a constant per query, which softmax ignores; the value bias passes
    through because the weights sum to one). With T tokens and n image tokens this costs
    O(n * C * T * heads) instead of O(n * C * C_internal) per prompt, and image tokens shared by
    all prompts (batch 1) are read once.

    Shapes: q_tok (B, T, C); k_img, v_img (1 or B, n, C). Returns (B, T, C).
    """
    B, T, C = q_tok.shape
    q_tilde = token_queries(attn, q_tok)  # (B, T*h, C)
    if k_img.shape[0] == 1:
        scores = q_tilde.reshape(-1, C) @ k_img[0].transpose(0, 1)  # (BTh, n)
        u = (torch.softmax(scores, dim=-1) @ v_img[0]).reshape(B, -1, C)  # (B, Th, C)
    else:
        scores = torch.bmm(q_tilde, k_img.transpose(1, 2))  # (B, Th, n)
        u = torch.bmm(torch.softmax(scores, dim=-1), v_img)  # (B, Th, C)
    return token_output(attn, u, T)


def image_update_terms(
    attn: Attention, k_tok: torch.Tensor, v_tok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token side of :func:`attend_image_to_tokens`: (k_tilde (B, heads*T, C), k_bias
    (B, heads*T, 1), v_out (B, heads*T, C)), rows (head, t). The scores of image token x_j are
    ``k_tilde . x_j + k_bias`` (softmax over t within each head), and the update of x_j is
    ``sum_(h,t) p_htj v_out_ht``."""
    B, T, C = k_tok.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    # scores[b, h, t, j] = k_bht . (W_q,h x_j + b_q,h) / sqrt(d) = (W_q,h^T k_bht) . x_j + k_bht . b_q,h
    k = attn.k_proj(k_tok).reshape(B, T, h, d) * d**-0.5
    k_tilde = torch.einsum("bthd,hdc->bhtc", k, attn.q_proj.weight.reshape(h, d, C)).reshape(B, h * T, C)
    k_bias = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.reshape(h, d)).reshape(B, h * T, 1)
    v = attn.v_proj(v_tok).reshape(B, T, h, d)
    v_out = torch.einsum("bthd,chd->bhtc", v, attn.out_proj.weight.reshape(C, h, d)).reshape(B, h * T, C)
    return k_tilde, k_bias, v_out


def attend_image_to_tokens(
    attn: Attention,
    q_img: torch.Tensor,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + attn(q_img, k_tok, v_tok)`` for many queries (image tokens) over few keys.

    Identical in value to :meth:`Attention.forward`; the output projection is applied to the
    few values first (V_h W_out,h^T), so the large (n x C_internal) x (C_internal x C) product
    becomes an (n x heads*T) x (heads*T x C) one, accumulated onto ``residual`` in the same
    product. A batch-1 ``q_img`` (image tokens shared by all prompts) is projected once. Scores
    are laid out (B, heads, T, n) so the softmax over the few tokens runs along contiguous memory.

    Shapes: q_img (1 or B, n, C); k_tok, v_tok (B, T, C); residual (1 or B, n, C).
    Returns (B, n, C).
    """
    B, T, C = k_tok.shape
    h = attn.num_heads
    n = q_img.shape[1]
    k_tilde, k_bias, v_out = image_update_terms(attn, k_tok, v_tok)
    if q_img.shape[0] == 1:
        scores = torch.addmm(k_bias.reshape(B * h * T, 1), k_tilde.reshape(B * h * T, C), q_img[0].transpose(0, 1))
    else:
        scores = torch.baddbmm(k_bias, k_tilde, q_img.transpose(1, 2))
    p = torch.softmax(scores.reshape(B, h, T, n), dim=2)  # normalised over the tokens
    base = attn.out_proj.bias if residual is None else residual + attn.out_proj.bias
    return torch.baddbmm(base.expand(B, n, C), p.reshape(B, h * T, n).transpose(1, 2), v_out)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image cross-attention, MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, T, C); keys (1 or B, n, C) (1: image tokens shared by all prompts);
        query_pe (B, T, C); key_pe (1, n, C). Returns queries (B, T, C), keys (B, n, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        q = queries + query_pe
        queries = self.norm2(queries + attend_tokens_to_image(self.cross_attn_token_to_image, q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(attend_image_to_tokens(self.cross_attn_image_to_token, k, q, queries, residual=keys))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` followed by a final token->image attention."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding (1 or B, C, h, w) (1: shared by all B prompts), image_pe (1, C, h, w),
        point_embedding (B, T, C). Returns tokens (B, T, C) and image tokens (B, h*w, C)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        if keys.shape[0] != queries.shape[0]:  # depth 0: keys are still shared
            keys = keys.expand(queries.shape[0], -1, -1)
        q = queries + point_embedding
        k = keys + key_pe
        out = attend_tokens_to_image(self.final_attn_token_to_image, q, k, keys)
        queries = self.norm_final_attn(queries + out)
        return queries, keys
