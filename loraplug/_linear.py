"""LoRA for ``nn.Linear``.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,    ΔW = s · B A

Shapes: x (..., in), W (out, in), A (r, in), B (out, r), y (..., out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layer import LoRALayer
from ._products import Scale, add_matmul, add_scaled_product
from ._registry import register_lora_layer


@register_lora_layer(nn.Linear)
class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear`` (or subclass): ``W x + b + (alpha/r) · B A x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> lp.inject_lora(model, target=["0"], rank=2)
        ['0']
        >>> model[0].lora_A["default"].shape, model[0].lora_B["default"].shape
        (torch.Size([2, 4]), torch.Size([3, 2]))
    """

    def base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._tensor("weight"), self._tensor("bias"))

    def add_lora(self, out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Scale) -> Tensor:
        # out + s · h Bᵀ with h = x Aᵀ (..., r), accumulated into out by one GEMM.
        return add_scaled_product(out, F.linear(x, a), b, scale)

    def routed_lora(self, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                    slot: Tensor | None) -> Tensor:
        if slot is not None:  # one (A, B, s) per row, gathered from the stacked adapters
            a, b, scale = a[slot], b[slot], scale[slot]
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))  # (n, L, r)
        h = h * scale.view(n, 1, 1)
        return torch.bmm(h, b.transpose(1, 2)).view(*x.shape[:-1], -1)  # (n, L, out)

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        add_matmul(target, b, a, scale)  # (out, r) @ (r, in) -> (out, in)

    def delta_blocks(self, delta: Tensor) -> Tensor:
        return delta.unsqueeze(0)  # (1, out, in)

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_features, in_features = self.weight.shape
        return (rank, in_features), (out_features, rank)
