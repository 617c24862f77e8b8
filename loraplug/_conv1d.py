"""LoRA for transformers' ``Conv1D`` (GPT-2 and its relatives): a Linear stored transposed.

    y = x W + b + s · (x Aᵀ) Bᵀ,    ΔW = s · (B A)ᵀ = s · Aᵀ Bᵀ

Shapes: x (..., in), W (in, out), A (r, in), B (out, r), y (..., out). A and B have
Linear's shapes, as in PEFT's files for these layers (``fan_in_fan_out: true``): only
ΔW is transposed to W's layout when merged.

This module imports transformers; loraplug imports it only when a model holds a
``Conv1D`` (the type is registered by name).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from ._linear import LoRALinear
from ._products import Scale, add_matmul
from ._registry import register_lora_layer


@register_lora_layer(Conv1D)
class LoRAConv1D(LoRALinear):
    """LoRA around a ``transformers.pytorch_utils.Conv1D``: ``x W + b + s · (x Aᵀ) Bᵀ``.

    W is (in, out); A (r, in) and B (out, r) as for ``nn.Linear``; merging adds
    ``s · (B A)ᵀ`` to W.
    """

    #: The weight is stored (in, out): PEFT's ``fan_in_fan_out``.
    fan_in_fan_out: ClassVar[bool] = True

    def base_forward(self, x: Tensor) -> Tensor:
        # Conv1D.forward itself: one addmm over the flattened rows.
        weight, bias = self._tensor("weight"), self._tensor("bias")
        size_out = (*x.size()[:-1], weight.shape[1])
        return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        add_matmul(target, a.t(), b.t(), scale)  # (in, r) @ (r, out) -> (in, out)

    def delta_blocks(self, delta: Tensor) -> Tensor:
        return delta.t().unsqueeze(0)  # ΔWᵀ = s B A: (1, out, in)

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features, out_features = self.weight.shape
        return (rank, in_features), (out_features, rank)
