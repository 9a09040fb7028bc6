"""CPU inference path of the mask decoder: the same computation, one block of image tokens at a time.

Per prompt the decoder's image side is a (4096, 256) token matrix (4 MiB) that the module-by-module
forward passes through memory a dozen times per layer (positional encoding added, scores, softmax
over the tokens, residual, layer norm, the next layer's scores), plus the output upscaling's
4-8 MiB intermediates, each a fresh allocation (page faults). Here, per two-way layer:

* the token->image attention's scores come from the previous pass (or, for the first layer, one
  blocked pass over the image tokens), the softmax runs over them, and the weighted sum of the
  image tokens is one matrix product;
* then, since the next attention's queries depend on the prompt tokens only, one pass over blocks
  of image tokens does, per block: the image->token attention (scores, softmax over the tokens,
  update onto the residual), the layer norm, and the next token->image attention's scores;
* the output upscaling (two 2x2 transposed convolutions as matrix products, layer norm, GELU) and
  the hypernetwork product run per block of token rows, writing the mask rows directly.

The per-block operations are those of :mod:`medsam.model.transformer` and
:meth:`MaskDecoder._upscale_and_project` (same products, same reductions per output element;
the one rearrangement: the image->token attention's output bias rides on its values, bias / heads
per value row, since each head's attention weights sum to one), so results equal the
module-by-module forward up to float rounding (relative 1e-6). Prompts run in small groups (see
:meth:`MaskDecoder.predict_masks`). The few full-size tensors
(image tokens of each layer, scores) live in scratch buffers kept from call to call
(:mod:`medsam.model._workspace`), so that decoding does not page-fault fresh memory every time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ._workspace import Scratch
from .transformer import image_update_terms, token_output, token_queries

if TYPE_CHECKING:
    from .mask_decoder import MaskDecoder
    from .transformer import TwoWayAttentionBlock, TwoWayTransformer

# Image tokens per block: a (prompts x 2048 x 256) fp32 block is 2 MiB per prompt.
BLOCK_TOKENS = 2048
# Image tokens per block of the output upscaling (whole rows of the token grid; the block's
# intermediates are 4-8x its 1 MiB of tokens).
UPSCALE_TOKENS = 1024

_gelu_ = torch.ops.aten.gelu_


def _self_attention(layer: "TwoWayAttentionBlock", queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
    """The prompt-token part at the start of a two-way block (self-attention, norm1)."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q, q, queries)
    return layer.norm1(queries)


def _scores(q_tilde: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> None:
    """out (B, R, n) = q_tilde (B, R, C) . k^T for image tokens k (1 or B, n, C), blockwise."""
    B, R, C = q_tilde.shape
    n = k.shape[1]
    for s in range(0, n, BLOCK_TOKENS):
        e = min(n, s + BLOCK_TOKENS)
        if k.shape[0] == 1:
            out[:, :, s:e] = torch.mm(q_tilde.reshape(B * R, C), k[0, s:e].t()).view(B, R, e - s)
        else:
            out[:, :, s:e] = torch.bmm(q_tilde, k[:, s:e].transpose(1, 2))


def _attend(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """softmax(scores) over the image tokens, times the image tokens: (B, R, n), (1 or B, n, C) -> (B, R, C)."""
    B, R, n = scores.shape
    p = torch.softmax(scores, dim=-1)
    if keys.shape[0] == 1:
        return torch.mm(p.view(B * R, n), keys[0]).view(B, R, -1)
    return torch.bmm(p, keys)


def _layer_norm_into(x: torch.Tensor, norm, out: torch.Tensor) -> None:
    """``out[...] = norm(x)`` for x, out (B, m, C), written straight into ``out``."""
    C = x.shape[-1]
    stats = x.new_empty(x.shape[1], 1), x.new_empty(x.shape[1], 1)
    for b in range(x.shape[0]):
        if out[b].is_contiguous():
            torch.ops.aten.native_layer_norm.out(
                x[b], [C], norm.weight, norm.bias, norm.eps, out0=out[b], out1=stats[0], out2=stats[1]
            )
        else:
            out[b] = F.layer_norm(x[b], (C,), norm.weight, norm.bias, norm.eps)


def _update_keys(
    layer: "TwoWayAttentionBlock",
    keys: torch.Tensor,
    k: torch.Tensor,
    key_pe: torch.Tensor,
    queries: torch.Tensor,
    query_pe: torch.Tensor,
    q_tilde_next: torch.Tensor,
    out_keys: torch.Tensor,
    out_k: torch.Tensor | None,
    out_scores: torch.Tensor,
) -> None:
    """norm4(keys + image->token attention) into ``out_keys`` (B, n, C), the same plus
    ``key_pe`` into ``out_k`` (unless None), and the next token->image scores
    ``q_tilde_next . (out_keys + key_pe)`` into ``out_scores`` (B, R, n), blockwise.

    ``k`` is ``keys + key_pe`` (1 or B, n, C). Each block is read before it is written, so the
    outputs may be ``keys`` and ``k`` themselves (updated in place) when those have batch B."""
    attn = layer.cross_attn_image_to_token
    B, T, C = queries.shape
    h = attn.num_heads
    n = keys.shape[1]
    k_tilde, k_bias, v_out = image_update_terms(attn, queries + query_pe, queries)
    # The output projection's bias: the weights p sum to one over the tokens of each head, so
    # adding bias / heads to every value row adds exactly the bias to every image token.
    v_out = v_out + attn.out_proj.bias / h
    shared = keys.shape[0] == 1
    if shared:
        k_tilde, k_bias = k_tilde.reshape(B * h * T, C), k_bias.reshape(B * h * T, 1)
    for s in range(0, n, BLOCK_TOKENS):
        e = min(n, s + BLOCK_TOKENS)
        m = e - s
        if shared:
            sc = torch.addmm(k_bias, k_tilde, k[0, s:e].t())
        else:
            sc = torch.baddbmm(k_bias, k_tilde, k[:, s:e].transpose(1, 2))
        p = torch.softmax(sc.view(B, h, T, m), dim=2).view(B, h * T, m)
        new = torch.baddbmm(keys[:, s:e].expand(B, m, C), p.transpose(1, 2), v_out)
        _layer_norm_into(new, layer.norm4, out_keys[:, s:e])
        if out_k is None:
            kn = new.copy_(out_keys[:, s:e]).add_(key_pe[s:e])
        else:
            kn = torch.add(out_keys[:, s:e], key_pe[s:e], out=out_k[:, s:e])
        out_scores[:, :, s:e] = torch.bmm(q_tilde_next, kn.transpose(1, 2))


def transformer(
    tf: "TwoWayTransformer",
    keys: torch.Tensor,
    k: torch.Tensor,
    key_pe: torch.Tensor,
    point_embedding: torch.Tensor,
    ws: Scratch,
    owned: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`TwoWayTransformer.forward` for image tokens ``keys`` (1 or B, n, C) (contiguous),
    ``k = keys + key_pe``, the positional encoding ``key_pe`` (n, C) and prompt tokens (B, T, C).

    With ``owned`` the caller hands over ``keys`` and ``k`` (batch B, scratch buffers of the
    caller's) to be updated in place; otherwise they are shared with other prompt groups (batch 1,
    even for a group of one prompt) and left as they are. The returned image tokens live
    in a scratch buffer or in ``keys``."""
    B, T, C = point_embedding.shape
    n = keys.shape[1]
    layers = list(tf.layers)
    queries = point_embedding
    # First token->image attention: its queries, then its scores in one blocked pass.
    if layers:
        queries = _self_attention(layers[0], queries, point_embedding)
        attn = layers[0].cross_attn_token_to_image
    else:
        attn = tf.final_attn_token_to_image
    q_tilde = token_queries(attn, queries + point_embedding)
    scores = ws.buffer("decoder.scores", (B, q_tilde.shape[1], n), keys)
    _scores(q_tilde, k, scores)
    for i, layer in enumerate(layers):
        u = _attend(scores, keys)  # the scores are consumed here and then rewritten below
        queries = layer.norm2(queries + token_output(attn, u, T))
        queries = layer.norm3(queries + layer.mlp(queries))
        # The next token->image attention's queries depend on the prompt tokens only.
        if i + 1 < len(layers):
            next_queries = _self_attention(layers[i + 1], queries, point_embedding)
            next_attn = layers[i + 1].cross_attn_token_to_image
        else:
            next_queries, next_attn = queries, tf.final_attn_token_to_image
        q_tilde_next = token_queries(next_attn, next_queries + point_embedding)
        last = i + 1 == len(layers)
        if owned:  # this group's own image tokens: update in place
            new_keys, new_k = keys, (None if last else k)
        else:
            new_keys = ws.buffer("decoder.keys", (B, n, C), keys)
            new_k = None if last else ws.buffer("decoder.k", (B, n, C), keys)
            owned = True
        _update_keys(layer, keys, k, key_pe, queries, point_embedding, q_tilde_next, new_keys, new_k, scores)
        keys, k, queries, attn = new_keys, new_k, next_queries, next_attn
    u = _attend(scores, keys)
    queries = tf.norm_final_attn(queries + token_output(attn, u, T))
    if keys.shape[0] != B:  # depth 0: the image tokens are still shared
        keys = keys.expand(B, -1, -1)
    return queries, keys


def upscale_and_project(
    decoder: "MaskDecoder",
    tokens: torch.Tensor,
    hyper_in: torch.Tensor,
    h: int,
    w: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:meth:`MaskDecoder._upscale_and_project` per block of token rows: tokens (B, h*w, C),
    hyper_in (B, M, C/8) -> (B, M, 4h, 4w) logits (into ``out`` when given)."""
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    B, n, C = tokens.shape
    M = hyper_in.shape[1]
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(C, 4 * c1)  # (C_in, (dy, dx, o))
    b1 = conv1.bias.repeat(4)
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    b2 = conv2.bias.repeat(4)
    masks = tokens.new_empty(B, M, 4 * h, 4 * w) if out is None else out
    rows = max(1, UPSCALE_TOKENS // w)
    for bi in range(B):
        hyper = hyper_in[bi].t()  # (C/8, M)
        for r0 in range(0, h, rows):
            r = min(rows, h - r0)
            x = torch.addmm(b1, tokens[bi, r0 * w : (r0 + r) * w], w1).view(-1, c1)
            x = _gelu_(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps), approximate=act1.approximate)
            x = _gelu_(torch.addmm(b2, x, w2), approximate=act2.approximate)  # rows (token, dy, dx), columns (ey, ex, o2)
            m = torch.mm(x.view(-1, c2), hyper)  # rows (y, x, dy, dx, ey, ex)
            # token (y, x), first block (dy, dx), second block (ey, ex) -> pixel (4y+2dy+ey, 4x+2dx+ex)
            m = m.view(r, w, 2, 2, 2, 2, M).permute(6, 0, 2, 4, 1, 3, 5)
            masks[bi, :, 4 * r0 : 4 * (r0 + r)].view(M, r, 2, 2, w, 2, 2).copy_(m)
    return masks


def image_tokens(
    image_embeddings: torch.Tensor, dense: torch.Tensor, pe: torch.Tensor, ws: Scratch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embedding + dense prompt embedding) as contiguous tokens (1 or B, h*w, C), the same
    plus the positional encoding, both in scratch buffers, and the positional encoding as
    (h*w, C) tokens. The sum is written straight into the token layout (the channels-last view
    of the buffer), one pass for the transposition and the addition."""
    Bk = max(image_embeddings.shape[0], dense.shape[0])
    _, C, h, w = image_embeddings.shape
    n = h * w
    tokens = ws.buffer("decoder.image_tokens", (Bk, n, C), image_embeddings)
    torch.add(image_embeddings, dense, out=tokens.view(Bk, h, w, C).permute(0, 3, 1, 2))
    key_pe = pe[0].reshape(C, n).t()
    if not key_pe.is_contiguous():
        key_pe = key_pe.contiguous()
    k = torch.add(tokens, key_pe, out=ws.buffer("decoder.image_k", (Bk, n, C), image_embeddings))
    return tokens, k, key_pe
