"""ΔW's matrix form: W (m, n) with ΔW = B A, B (m, r), A (r, n) (see ``_inits``, ``_dora``).

Linear: W itself; Conv, grouped ones too: W viewed (out, in/groups·k…), ΔW = B A over
it (see ``_conv``); a layer whose ΔW is (B A)ᵀ (``transposed_delta``: Embedding,
transformers' Conv1D) works on Wᵀ. The rows of the form are the layer's output channels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor

from ._products import compute_dtype

if TYPE_CHECKING:
    from ._layer import LoRALayer


def transposed(layer: LoRALayer) -> bool:
    """Whether the layer's ΔW is (B A)ᵀ."""
    return bool(layer.transposed_delta or getattr(layer, "fan_in_fan_out", False))


def matrix_shape(layer: LoRALayer) -> tuple[int, int]:
    """(m, n) of the weight's matrix form."""
    shape = tuple(layer.weight.shape)
    if transposed(layer):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def as_matrix(layer: LoRALayer, tensor: Tensor) -> Tensor:
    """A weight-shaped tensor as (m, n), a view where possible."""
    if transposed(layer):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def weight_matrix(layer: LoRALayer, weight: Tensor) -> Tensor:
    """The weight as (m, n) in ΔW's compute dtype, a copy."""
    w = weight.detach().to(compute_dtype(weight.dtype), copy=True)
    return as_matrix(layer, w).contiguous()


def form_problem(layer: LoRALayer, rank: int) -> bool:
    """Whether A and B of ``rank`` are *not* the matrix form's factors, by their shapes."""
    m, n = matrix_shape(layer)
    shape_a, shape_b = layer.adapter_shapes(rank)
    return (layer.weight.dim() < 2 or shape_a[0] != rank or shape_b[0] != m
            or math.prod(shape_a) != rank * n or math.prod(shape_b) != rank * m)
