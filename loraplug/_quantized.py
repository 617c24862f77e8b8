"""Quantized base weights: how loraplug reads, rewrites and measures a weight stored quantized.

A quantized layer keeps its weight packed: bitsandbytes' 4-bit ``Params4bit`` is a
``(out·in/2, 1)`` uint8 tensor plus a quantization state, its 8-bit ``Int8Params`` an int8
``(out, in)`` tensor plus one scale per row, and torchao's weight-only quantization swaps
an ``nn.Linear``'s weight for a tensor subclass (``Int8Tensor``, ...). loraplug never
computes with the packed values itself: the base layer's own forward does. Everything
else asks the weight's *format* (a :class:`QuantizedWeight`), looked up from the weight
tensor's type:

- ``shape``: the logical ``(out, in)``, which A and B are shaped from;
- ``dequantize``: the dense weight ``W`` the layer computes with;
- ``requantize``: replace the stored weight by the quantized form of a dense one (only
  for an explicit ``merge(model, requantize=True)``);
- ``snapshot`` / ``restore``: keep and put back the stored weight exactly (unmerge);
- ``bytes_per_weight`` and ``kind``: what ``summary`` and ``loraplug targets`` show.

Formats of optional packages are registered by the tensor type's qualified name and
imported the first time a model holds such a weight, so importing loraplug never imports
bitsandbytes or torchao.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from ._errors import StateError
from ._registry import register_by_name

if TYPE_CHECKING:
    from ._layer import LoRALayer

#: Weight tensor types (by qualified name, matched along their MRO) -> the loraplug module
#: whose import registers their format.
_FORMAT_MODULES: dict[str, str] = {
    "bitsandbytes.nn.modules.Params4bit": "loraplug._bnb",
    "bitsandbytes.nn.modules.Int8Params": "loraplug._bnb",
    "torchao.utils.TorchAOBaseTensor": "loraplug._torchao",
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor.NF4Tensor": "loraplug._torchao",
}
_FORMATS: dict[type, QuantizedWeight] = {}

# bitsandbytes' layers subclass nn.Linear but compute with packed weights: they get their
# own LoRA layers. torchao keeps nn.Linear and is recognised from the weight instead.
register_by_name("bitsandbytes.nn.modules.Linear4bit", "loraplug._bnb")
register_by_name("bitsandbytes.nn.modules.Linear8bitLt", "loraplug._bnb")


class QuantizedWeight:
    """How to read and rewrite one kind of quantized weight of a Linear-like module.

    Each method receives the base module that holds the weight (its ``weight`` and, for
    some formats, state beside it). Formats are stateless: one instance per format.
    """

    #: The LoRA layer for a module whose own type maps to a plain layer (torchao keeps
    #: ``nn.Linear`` and swaps only the weight); ``None`` when the module type has its own.
    layer_class: type[LoRALayer] | None = None
    #: Extra state-dict entries the module writes beside ``weight`` (relative names, or
    #: prefixes ending in ``.``), dropped when a plain checkpoint is written.
    state_keys: tuple[str, ...] = ()

    def kind(self, module: Any) -> str:
        """A short name for messages and tables, e.g. ``"nf4"`` or ``"torchao Int8Tensor"``."""
        raise NotImplementedError

    def shape(self, module: Any) -> tuple[int, int]:
        """The logical ``(out_features, in_features)`` of the weight."""
        return module.out_features, module.in_features

    def dequantize(self, module: Any) -> Tensor:
        """A fresh dense ``(out, in)`` tensor of the weight the module computes with."""
        raise NotImplementedError

    def requantize(self, module: Any, dense: Tensor) -> None:
        """Replace the module's stored weight by the quantized form of ``dense`` (out, in)."""
        raise NotImplementedError

    def requantize_problem(self, module: Any) -> str | None:
        """Why this weight cannot be requantized, or ``None`` when it can."""
        return None

    def snapshot(self, module: Any) -> object:
        """What ``restore`` needs to put the stored weight back exactly."""
        return module._parameters["weight"]

    def restore(self, module: Any, kept: object) -> None:
        """Put back what ``snapshot`` returned."""
        module._parameters["weight"] = kept

    def bytes_per_weight(self, module: Any) -> float:
        """Bytes of storage per logical weight element, statistics included."""
        raise NotImplementedError


F = TypeVar("F", bound=type[QuantizedWeight])


def register_weight_format(tensor_type: type) -> Callable[[F], F]:
    """Class decorator: instances of ``tensor_type`` (and subclasses) use this format."""

    def decorate(cls: F) -> F:
        _FORMATS[tensor_type] = cls()
        return cls

    return decorate


def weight_format(module: nn.Module) -> QuantizedWeight | None:
    """The format of ``module``'s quantized weight, or ``None`` for a plain weight."""
    weight = module._parameters.get("weight")
    kind = type(weight)
    if weight is None or kind is nn.Parameter or kind is Tensor:
        return None
    for ancestor in kind.__mro__:
        name = f"{ancestor.__module__}.{ancestor.__qualname__}"
        if name in _FORMAT_MODULES:
            importlib.import_module(_FORMAT_MODULES.pop(name))
        found = _FORMATS.get(ancestor)
        if found is not None:
            return found
    return None


def logical_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape as the layer computes with it (not the packed storage's)."""
    fmt = weight_format(module)
    if fmt is not None:
        return fmt.shape(module)
    weight = module._parameters.get("weight")
    return tuple(weight.shape) if weight is not None else ()


def describe_weight(module: nn.Module) -> tuple[str, float] | None:
    """``(kind, bytes per weight)`` of a module's weight, quantized or not; ``None`` if none."""
    fmt = weight_format(module)
    if fmt is not None:
        return fmt.kind(module), fmt.bytes_per_weight(module)
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    return str(weight.dtype).removeprefix("torch."), float(weight.element_size())


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, a quantized weight counted at its logical size."""
    from ._layer import LoRALayer

    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        base: Any = module.base_layer if isinstance(module, LoRALayer) else module
        fmt = weight_format(base)
        if fmt is not None:
            out_features, in_features = fmt.shape(base)
            total += out_features * in_features - base.weight.numel()
    return total


def _still_quantized(value: Tensor, shape: tuple[int, ...]) -> bool:
    # A merged weight that save_merged already computed is a plain float tensor of the
    # logical shape; anything else under a quantized module's "weight" is packed.
    return not (type(value) is Tensor and value.is_floating_point() and value.shape == shape)


@torch.no_grad()
def plain_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every quantized weight dequantized and its statistics dropped.

    The result is what the same architecture built with plain ``nn.Linear`` layers loads:
    a ``(out, in)`` float weight per layer, no ``weight.absmax``, ``SCB`` or similar keys.
    Weights already replaced by plain tensors (merged ones) are kept as they are.
    """
    from ._layer import LoRALayer

    for path, module in model.named_modules(remove_duplicate=False):
        base = module.base_layer if isinstance(module, LoRALayer) else module
        fmt = weight_format(base)
        if fmt is None:
            continue
        prefix = f"{path}." if path else ""
        for key in list(state):
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest is not None and any(rest == k or (k.endswith(".") and rest.startswith(k))
                                        for k in fmt.state_keys):
                del state[key]
        key = f"{prefix}weight"
        if key in state and _still_quantized(state[key], fmt.shape(base)):
            state[key] = fmt.dequantize(base)
    return state


def quantized_layer_class(module: nn.Module, layer_cls: type[LoRALayer]) -> type[LoRALayer]:
    """``layer_cls``, or the subclass of it that the module's quantized weight asks for."""
    fmt = weight_format(module)
    if fmt is not None and fmt.layer_class is not None and issubclass(fmt.layer_class, layer_cls):
        return fmt.layer_class
    return layer_cls


def refuse_quantized(layers: list[tuple[str, LoRALayer]], action: str, *,
                     requantize: bool = False) -> None:
    """Raise unless the unmerged quantized layers among ``layers`` can be merged.

    Without ``requantize`` a quantized layer cannot merge at all; with it, its format
    must be able to requantize.
    """
    todo = [(n, layer.base_layer, layer.weight_format) for n, layer in layers
            if is_quantized(layer) and not layer.merged]
    if todo and not requantize:
        raise StateError(
            f"{action}: {[n for n, _, _ in todo][:5]} hold quantized weights; merging would "
            "round W + ΔW back to the quantized grid, which changes the base by more than "
            "the adapter. Keep the adapters unmerged (QLoRA's usual way), call "
            "loraplug.merge(model, requantize=True) to requantize and get the error it "
            "introduced per layer, or write full-precision merged weights with "
            "loraplug.save_merged."
        )
    problems = [(n, why) for n, base, fmt in todo if (why := fmt.requantize_problem(base))]
    if problems:
        raise StateError(f"{action}: nothing was merged; cannot requantize "
                         + "; ".join(f"{n!r}: {why}" for n, why in problems[:5]))


def is_quantized(layer: LoRALayer) -> bool:
    """Whether ``layer`` wraps a weight stored quantized (it merges only by requantizing)."""
    return getattr(layer, "weight_format", None) is not None
