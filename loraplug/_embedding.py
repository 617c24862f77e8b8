"""LoRA for ``nn.Embedding``.

    y = W[ids] + s · Aᵀ[ids] Bᵀ,    ΔW = s · (B A)ᵀ

Shapes: ids (...), W (V, d), A (r, V), B (d, r), y (..., d). A starts at zero and B
is random (the reverse of Linear), as in PEFT, so ``lora_embedding_A/B`` files carry over.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layer import LoRALayer
from ._products import Scale, add_matmul, add_scaled_product
from ._registry import register_lora_layer


@register_lora_layer(nn.Embedding)
class LoRAEmbedding(LoRALayer):
    """LoRA around an ``nn.Embedding`` (or subclass).

    ``padding_idx`` and ``scale_grad_by_freq`` apply to the adapter's lookup as to the
    base's. ``max_norm`` is applied to the adapted rows ``W[ids] + ΔW[ids]`` without
    writing to ``W`` (``nn.Embedding`` renormalises its weight in place; a LoRA layer
    never changes ``W`` outside ``merge``). Dropout is not applied: inputs are indices.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Embedding(10, 4))
        >>> lp.inject_lora(model, target=nn.Embedding, rank=2)
        ['0']
        >>> model[0].lora_A["default"].shape, model[0].lora_B["default"].shape
        (torch.Size([2, 10]), torch.Size([4, 2]))
    """

    zero_init = "A"
    supports_dropout = False
    peft_key_style = "embedding"

    def configure(self, base: nn.Module) -> None:
        base = cast(nn.Embedding, base)
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse

    def forward(self, ids: Tensor) -> Tensor:
        out = super().forward(ids)
        if self.max_norm is not None and not self.through_weight:
            out = self._renorm(out)
        return out

    def _renorm(self, rows: Tensor) -> Tensor:
        # What nn.Embedding's in-place renorm does to each looked-up row, out of place;
        # like it, the factor is computed in float64, rounded once, and not differentiated.
        with torch.no_grad():
            norms = torch.linalg.vector_norm(rows, ord=self.norm_type, dim=-1, keepdim=True)
            norms = norms.double()
            scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), 1.0)
        return rows * scale.to(rows.dtype)

    def base_forward(self, ids: Tensor) -> Tensor:
        return F.embedding(
            ids, self._tensor("weight"), self.padding_idx, None, 2.0, self.scale_grad_by_freq,
            self.sparse,
        )

    def _rows_of_a(self, ids: Tensor, a: Tensor) -> Tensor:
        # Aᵀ[ids]: (..., r). Same padding_idx and gradient scaling as the base lookup.
        return F.embedding(ids, a.t(), self.padding_idx, None, 2.0, self.scale_grad_by_freq)

    def add_lora(self, out: Tensor, ids: Tensor, a: Tensor, b: Tensor, scale: Scale) -> Tensor:
        return add_scaled_product(out, self._rows_of_a(ids, a), b, scale)

    def routed_lora(self, ids: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                    slot: Tensor | None) -> Tensor:
        n, rank, vocab = a.shape
        rows = ids.shape[0]
        slot = torch.arange(rows, device=ids.device) if slot is None else slot
        # One lookup table for all adapters: row j·V + v is Aⱼᵀ[v], (n·V, r).
        table = a.transpose(1, 2).reshape(n * vocab, rank)
        offset = (slot * vocab).view(rows, *([1] * (ids.dim() - 1)))
        h = F.embedding(ids + offset, table, None, None, 2.0, self.scale_grad_by_freq)
        if self.padding_idx is not None and torch.is_grad_enabled():
            # What padding_idx does for the plain lookup: that row gets no gradient.
            h = torch.where((ids == self.padding_idx).unsqueeze(-1), h.detach(), h)
        h = h * scale[slot].view(rows, *([1] * (h.dim() - 1)))
        return torch.bmm(h.reshape(rows, -1, rank), b[slot].transpose(1, 2)).view(
            *ids.shape, -1)  # (rows, L, r) @ (rows, r, d) -> (rows, L, d)

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        add_matmul(target, a.t(), b.t(), scale)  # (V, r) @ (r, d) -> (V, d)

    def delta_blocks(self, delta: Tensor) -> Tensor:
        return delta.t().unsqueeze(0)  # ΔWᵀ = s B A: (1, d, V)

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num_embeddings, dim = self.weight.shape
        return (rank, num_embeddings), (dim, rank)
