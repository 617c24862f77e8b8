"""Modules that read a LoRA layer's weight instead of calling the layer.

Some modules compute with a child's weight directly: torchvision's Swin attention calls
``shifted_window_attention(x, self.qkv.weight, self.proj.weight, ...)``,
``nn.MultiheadAttention`` reads ``out_proj.weight``, ``nn.TransformerEncoderLayer``'s
inference fast path reads ``linear1.weight``, and any user module may do
``F.linear(x, self.proj.weight)``. A branch added to the layer's output would never be
computed there. So inside any module's forward, reading ``layer.weight`` of a LoRA layer
with live adapters returns the adapted weight

    W' = W + Σ_a s_a ΔW_a        (differentiable in every A and B)

which is exactly the weight a merge writes: such an owner computes the adapted
function, its adapters train, and merged equals unmerged. Everywhere else (a training
script, an optimizer, loraplug itself) ``layer.weight`` is the parameter, as always.

How the read is found: a LoRA layer keeps its weight in its parameter registry, so the
attribute goes through ``__getattr__``, which the layer's own forward never uses (it
reads the registry directly): nothing is added to the layer's hot path. In
``__getattr__``, the caller's frame says where the read comes from: loraplug's own
code, code running inside an ``nn.Module`` call (a ``Module.__call__`` frame up the
stack), or neither. Under ``torch.compile`` every read is inside the compiled forward.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

#: The frames of ``nn.Module.__call__``: a read below one of them happens in a forward.
_CALL_FRAMES = frozenset(
    getattr(nn.Module, name).__code__ for name in ("_call_impl", "_wrapped_call_impl")
    if hasattr(nn.Module, name)
)
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def read_in_forward(depth: int = 2) -> bool:
    """Whether the attribute read ``depth`` frames above this call runs in a forward.

    ``depth`` 2 is the code that read the attribute when called from ``__getattr__``.
    Reads by loraplug's own code are never counted.
    """
    if torch.compiler.is_compiling():
        return False
    frame = sys._getframe(depth)
    if frame.f_code.co_filename.startswith(_PACKAGE):
        return False
    while frame is not None:
        if frame.f_code in _CALL_FRAMES:
            return True
        frame = frame.f_back
    return False
