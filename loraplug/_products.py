"""The products every layer type's hooks are made of, each accumulating into its target.

A LoRA branch adds ``s · B A x`` to an output that was just computed, and a merge adds
``s · ΔW`` to a weight; both are a matrix product added to a tensor that already exists.
Done as one GEMM with ``beta = 1`` and ``alpha = s``, neither the product nor the
scaling needs a temporary of the target's size. The scale ``s`` is a Python float in
eager mode and a 0-d tensor (a gate read from ``_lora_scales``) under ``torch.compile``;
a GEMM's ``alpha`` must be a number, so a tensor scale multiplies the small factor instead.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

#: An adapter's scaling: a float in eager mode, a 0-d gate tensor under torch.compile.
Scale: TypeAlias = float | Tensor

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ΔW is computed in: float32 for half-precision weights, else the weight's own."""
    return torch.float32 if dtype in _HALF else dtype


def add_scaled_product(out: Tensor, h: Tensor, b: Tensor, scale: Scale) -> Tensor:
    """``out + scale · h bᵀ`` over the last dimension, as one GEMM that accumulates.

    Shapes: out (..., d), h (..., r), b (d, r). ``out`` must be a fresh result of the
    base computation, not saved for backward: it is written in place where autograd
    does not record, or does not need a view for it. The scale is the GEMM's ``alpha``,
    so neither the product nor the scaling needs an output-sized temporary.
    """
    if out.dtype == h.dtype == b.dtype and type(scale) is float and out.is_contiguous():
        flat = out if out.dim() == 2 else out.view(-1, out.shape[-1])
        h = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled() and (out.dim() != 2 or out._is_view()):
            # Autograd would turn an in-place write into a view into two full copies of
            # the gradient (CopySlices); a new result costs one copy of the output.
            return torch.addmm(flat, h, b.t(), alpha=scale).view(out.shape)
        flat.addmm_(h, b.t(), alpha=scale)
        return out
    # Mixed dtypes (autocast), a gate tensor or an unusual layout: the plain sum.
    return out + F.linear(h * scale, b)


def add_matmul(target: Tensor, m1: Tensor, m2: Tensor, scale: Scale) -> None:
    """``target += scale · m1 @ m2`` in place, batched over the first dimension when 3-d.

    The factors are cast to ``target``'s dtype (:func:`compute_dtype` of the weight, for
    a merge). A tensor ``scale`` multiplies ``m1`` (r columns in LoRA's use) instead.
    """
    m1, m2 = m1.to(target.dtype), m2.to(target.dtype)
    if isinstance(scale, Tensor):
        m1, scale = m1 * scale, 1.0
    if target.dim() == 3:
        target.baddbmm_(m1, m2, alpha=scale)
    else:
        target.addmm_(m1, m2, alpha=scale)
