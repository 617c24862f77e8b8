"""LoRA for ``nn.Linear``.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,    ΔW = s · B A

Shapes: x (..., in), W (out, in), A (r, in), B (out, r), y (..., out).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._layer import LoRALayer, compute_dtype
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
        return F.linear(x, self.weight, self.bias)

    def lora_forward(self, x: Tensor, name: str) -> Tensor:
        # Scale the rank-r intermediate: r·N multiplications instead of out·N.
        h = F.linear(x, self.lora_A[name])
        return F.linear(h * self.scaling[name], self.lora_B[name])

    def delta_weight(self, name: str) -> Tensor:
        dtype = compute_dtype(self.weight.dtype)
        a, b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        return (b @ a).mul_(self.scaling[name])  # (out, r) @ (r, in) -> (out, in)

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_features, in_features = self.weight.shape
        return (rank, in_features), (out_features, rank)
