"""Multi-head attention as ``nn.MultiheadAttention`` computes it outside its fast path.

``forward`` below is ``nn.MultiheadAttention.forward`` with its fast path left out,
followed by ``F.multi_head_attention_forward``, op for op, except at two places that a
LoRA layer supplies:

- ``layer.project(query, key, value)`` returns the projected q, k, v (each (L or S, N, E),
  sequence first) where torch computes ``x Wᵀ + b``;
- ``layer.out_projection(attn, tgt_len, bsz)`` returns the output projection of the
  attention (``attn`` (L·N, E), rows in (L, N) order) as (L, N, E).

Everything between (masks, ``add_bias_kv``, ``add_zero_attn``, the attention itself,
dropout and the returned weights) uses the same kernels in the same layouts as torch's
own composite path, so with adapters that add nothing the result is that path's, bit for
bit. (torch's fused inference kernel, taken in eval mode without gradients, rounds
differently from its own composite path, by a few ulps.)
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionLayer(Protocol):
    """What :func:`forward` needs from a LoRA attention layer."""

    base_layer: nn.MultiheadAttention
    training: bool

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ...

    def out_projection(self, attn: Tensor, tgt_len: int, bsz: int) -> Tensor:
        ...


def forward(
    layer: AttentionLayer, query: Tensor, key: Tensor, value: Tensor,
    key_padding_mask: Tensor | None = None, need_weights: bool = True,
    attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` outside its fast path; see the module docstring."""
    mha = layer.base_layer
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
        target_type=query.dtype)
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=query.dtype, check_other=False)
    transpose = mha.batch_first and is_batched
    if transpose:  # to (L, N, E), keeping which of query, key, value are the same tensor
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (t.transpose(1, 0) for t in (query, key))
                value = key
        else:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    out, weights = _attend(layer, mha, query, key, value, key_padding_mask, need_weights,
                           attn_mask, average_attn_weights, is_causal)
    return (out.transpose(1, 0) if transpose else out), weights


def _attend(layer: AttentionLayer, mha: nn.MultiheadAttention, query: Tensor, key: Tensor,
            value: Tensor, key_padding_mask: Tensor | None, need_weights: bool,
            attn_mask: Tensor | None, average: bool, is_causal: bool
            ) -> tuple[Tensor, Tensor | None]:
    heads = mha.num_heads
    is_batched = F._mha_shape_check(  # type: ignore[attr-defined]
        query, key, value, key_padding_mask, attn_mask, heads)
    if not is_batched:  # a batch of one; separate tensors from here on, as in torch
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "is_causal=True needs attn_mask as well (nn.MultiheadAttention's rule); pass the "
            "causal mask, e.g. nn.Transformer.generate_square_subsequent_mask(L).")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the attention kernel applies the causal mask itself
    elif key_padding_mask is not None:
        is_causal = False  # merged with the padding mask below, the mask is no longer causal
    head_dim = embed_dim // heads
    q, k, v = layer.project(query, key, value)
    attn_mask = _mask_3d(attn_mask, tgt_len, src_len, bsz * heads)
    if mha.bias_k is not None and mha.bias_v is not None:
        k = torch.cat([k, mha.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, mha.bias_v.repeat(1, bsz, 1)])
        attn_mask, key_padding_mask = _one_more_key(attn_mask, key_padding_mask)
    # (L, N, E) -> (N·heads, L, head_dim)
    q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if mha.add_zero_attn:
        zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask, key_padding_mask = _one_more_key(attn_mask, key_padding_mask)
    src_len = k.size(1)
    if key_padding_mask is not None:
        attn_mask = _with_padding(attn_mask, key_padding_mask, bsz, heads, src_len)
    dropout_p = mha.dropout if layer.training else 0.0
    if need_weights:
        # (is_causal needs attn_mask here, and the mask carries it)
        return _with_weights(layer, q, k, v, attn_mask, dropout_p, average, is_batched,
                             (tgt_len, bsz, heads, embed_dim))
    if attn_mask is not None:  # (1, L, S) or (N·heads, L, S) -> broadcastable to (N, heads, L, S)
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, heads, -1, src_len)
    q = q.view(bsz, heads, tgt_len, head_dim)
    k = k.view(bsz, heads, src_len, head_dim)
    v = v.view(bsz, heads, src_len, head_dim)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    attn = attn.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)  # rows in (L, N) order
    out = layer.out_projection(attn, tgt_len, bsz)
    return (out if is_batched else out.squeeze(1)), None


def _one_more_key(attn_mask: Tensor | None, key_padding_mask: Tensor | None
                  ) -> tuple[Tensor | None, Tensor | None]:
    # A key was appended (bias_k, or the zero attention): the masks let it through.
    return (None if attn_mask is None else F.pad(attn_mask, (0, 1)),
            None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1)))


def _with_padding(attn_mask: Tensor | None, key_padding_mask: Tensor, bsz: int, heads: int,
                  src_len: int) -> Tensor:
    """The attention mask with the key padding mask (N, S) added, as (N·heads, 1 or L, S)."""
    shape = tuple(key_padding_mask.shape)
    torch._check_with(
        AssertionError, shape == (bsz, src_len),
        lambda: f"expected key_padding_mask of shape {(bsz, src_len)}, received {shape}")
    padding = (key_padding_mask.view(bsz, 1, 1, src_len)
               .expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len))
    return padding if attn_mask is None else attn_mask + padding


def _mask_3d(attn_mask: Tensor | None, tgt_len: int, src_len: int,
             rows: int) -> Tensor | None:
    """The attention mask as (1 or N·heads, L, S), its shape checked as torch checks it."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (tgt_len, src_len):
            raise RuntimeError(
                f"the 2D attn_mask has shape {tuple(attn_mask.shape)}; expected "
                f"{(tgt_len, src_len)} (target length, source length).")
        return attn_mask.unsqueeze(0)
    if tuple(attn_mask.shape) != (rows, tgt_len, src_len):
        raise RuntimeError(
            f"the 3D attn_mask has shape {tuple(attn_mask.shape)}; expected "
            f"{(rows, tgt_len, src_len)} (batch·heads, target length, source length).")
    return attn_mask


def _with_weights(layer: AttentionLayer, q: Tensor, k: Tensor, v: Tensor,
                  attn_mask: Tensor | None, dropout_p: float, average: bool,
                  is_batched: bool, dims: tuple[int, int, int, int]
                  ) -> tuple[Tensor, Tensor]:
    tgt_len, bsz, heads, embed_dim = dims
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    if attn_mask is not None:
        weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    else:
        weights = torch.bmm(q_scaled, k.transpose(-2, -1))
    weights = F.softmax(weights, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    attn = torch.bmm(weights, v)
    attn = attn.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)  # rows in (L, N) order
    out = layer.out_projection(attn, tgt_len, bsz)
    weights = weights.view(bsz, heads, tgt_len, -1)
    if average:
        weights = weights.mean(dim=1)
    if not is_batched:
        out, weights = out.squeeze(1), weights.squeeze(0)
    return out, weights
