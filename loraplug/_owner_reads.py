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
attribute goes through ``__getattr__``; the built-in layers' forwards read the registry
directly, and while a layer's own forward runs (a flag it sets), its reads (a
``base_forward`` written against ``self.weight``) get the parameter. Otherwise the
frames above the read say where it comes from: code running inside an ``nn.Module``
call (a ``Module.__call__`` frame up the stack) counts, unless code that manages
parameters comes first (loraplug itself, torch.distributed's FSDP2 hooks). Under
``torch.compile`` every read is inside the compiled forward: loraplug's compiled paths
read the registry, never the attribute.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import _variants
from ._compile import gated_adapters
from ._errors import StateError
from ._stand_in import StandIn

if TYPE_CHECKING:
    from ._layer import LoRALayer
    from ._products import Scale

#: The frames of ``nn.Module.__call__``: a read below one of them happens in a forward.
_CALL_FRAMES = frozenset(
    getattr(nn.Module, name).__code__ for name in ("_call_impl", "_wrapped_call_impl")
    if hasattr(nn.Module, name)
)
#: Code that manages parameters rather than computing with them: loraplug itself, and
#: torch.distributed (FSDP2 looks its parameters up by name in its pre-forward hooks).
_MANAGERS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "distributed") + os.sep,
)


#: Activation checkpointing reruns forward code from backward, with no module call above.
_RECOMPUTE = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "utils",
                          "checkpoint.py")


def read_in_forward(depth: int = 2) -> bool:
    """Whether the attribute read ``depth`` frames above this call runs in a forward.

    ``depth`` 2 is the code that read the attribute when called from ``__getattr__``.
    Walking up from it, the read counts when an ``nn.Module.__call__`` frame comes before
    any code of loraplug or torch.distributed.
    """
    if torch.compiler.is_compiling():
        return True
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        if code in _CALL_FRAMES or code.co_filename == _RECOMPUTE:
            return True
        if code.co_filename.startswith(_MANAGERS):
            return False
        frame = frame.f_back
    return False


def weight_for_reader(layer: LoRALayer) -> Tensor:
    """The weight a module sees when it reads ``layer.weight`` in its own forward:
    ``W + Σ s·ΔW`` over the live adapters (all of them, gated, under ``torch.compile``)."""
    names: tuple[str, ...]
    scales: Mapping[str, Scale]
    if torch.compiler.is_compiling():
        names, scales = gated_adapters(layer)
    else:
        names, scales = layer._live, layer.scaling
    if not names:
        return layer._tensor("weight")
    if getattr(layer._detour, "per_row", False):
        raise StateError(
            "adapter_per_sample: a module reads this layer's weight in its own forward "
            "instead of calling the layer, and one weight cannot differ per row. Leave "
            "this layer out of the adapters used per row."
        )
    if layer._extended and _variants.registry(layer, "lora_B_bias").keys() & set(names):
        raise StateError(
            "a module reads this layer's weight in its own forward instead of calling the "
            "layer, and B's bias (lora_bias) of its adapter would be missed there. Train this "
            "layer without lora_bias."
        )
    return layer._adapted_weight(names, scales)


class ReadableWeight(StandIn):
    """The part of :class:`loraplug.LoRALayer` that other code's reads of ``weight`` see.

    ``forward`` marks the layer's own forward as running (its reads get the parameter)
    around ``_forward``, the layer's computation; ``__getattr__`` hands ``W + ΔW`` to a
    module that reads the weight in its forward, and reads the base module's attributes
    (``in_features``, ``kernel_size``, ...) through.
    """

    #: Whether another module's read of ``weight`` in its forward gets ``W + ΔW``. Off for
    #: quantized weights: such a read is of the stored form (T5 reads ``wo.weight.dtype``),
    #: which a module cannot compute with directly anyway.
    reads_see_delta: bool = True

    def forward(self, x: Tensor) -> Tensor:
        state = self.__dict__
        state["_in_forward"] = True
        try:
            return self._forward(x)
        finally:
            state["_in_forward"] = False

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_key(self) -> tuple[nn.Module, str]:
        """The module that registers ``weight`` in the model, and its key there."""
        return self, "weight"

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__
        if name == "weight" and not state.get("_in_forward") and self.reads_see_delta \
                and "weight" in state["_parameters"] and read_in_forward():
            return weight_for_reader(self)  # type: ignore[arg-type]
        return super().__getattr__(name)
