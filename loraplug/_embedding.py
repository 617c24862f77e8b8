"""LoRA for ``nn.Embedding``.

    y = W[ids] + s · Aᵀ[ids] Bᵀ,    ΔW = s · (B A)ᵀ

Shapes: ids (...), W (V, d), A (r, V), B (d, r), y (..., d). A starts at zero and B
is random (the reverse of Linear), as in PEFT, so ``lora_embedding_A/B`` files carry over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layer import LoRALayer, compute_dtype
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

    def configure(self, base: nn.Module) -> None:
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
        # like it, the factor is not differentiated.
        with torch.no_grad():
            norms = torch.linalg.vector_norm(rows, ord=self.norm_type, dim=-1, keepdim=True)
            scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), 1.0)
        return rows * scale.to(rows.dtype)

    def base_forward(self, ids: Tensor) -> Tensor:
        return F.embedding(
            ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse
        )

    def lora_forward(self, ids: Tensor, name: str) -> Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        h = F.embedding(ids, a.t(), self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        return F.linear(h * self.scaling[name], b)  # (..., r) @ (r, d)ᵀ -> (..., d)

    def delta_weight(self, name: str) -> Tensor:
        dtype = compute_dtype(self.weight.dtype)
        a, b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        return (a.t() @ b.t()).mul_(self.scaling[name])  # (V, r) @ (r, d) -> (V, d)

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num_embeddings, dim = self.weight.shape
        return (rank, num_embeddings), (dim, rank)
