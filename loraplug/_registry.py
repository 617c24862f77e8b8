"""The registry that maps a base module type to the LoRA layer class that wraps it.

Lookups walk the base type's method resolution order, so a subclass of ``nn.Linear``
finds the layer registered for ``nn.Linear``; the most specific registered ancestor
wins, which lets a user register a dedicated layer for their own subclass.
:func:`lora_layer_for` is the one place a LoRA layer is built around a module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

from ._errors import ConfigError, TargetError

if TYPE_CHECKING:
    from ._layer import LoRALayer

_REGISTRY: dict[type[nn.Module], type[LoRALayer]] = {}

#: Base types of optional packages, by qualified class name -> the loraplug module that
#: registers their layer when imported. Looked up only when a model holds such a type,
#: so importing loraplug never imports transformers, bitsandbytes or torchao.
_BY_NAME: dict[str, str] = {}

L = TypeVar("L", bound="type[LoRALayer]")


def register_lora_layer(base_type: type[nn.Module]) -> Callable[[L], L]:
    """Register a LoRA layer class for ``base_type`` and its subclasses.

    Use it as a class decorator. Registering a type that already has a layer replaces
    the old entry, so a user can override the built-in layers too.

    Args:
        base_type: the ``nn.Module`` subclass the layer wraps.

    Returns:
        A decorator that registers the class and returns it unchanged.

    Raises:
        ConfigError: ``base_type`` is not an ``nn.Module`` subclass, or the decorated
            class is not a :class:`LoRALayer` subclass.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> class Scaled(nn.Linear):
        ...     pass
        >>> @lp.register_lora_layer(Scaled)
        ... class LoRAScaled(lp.LoRALinear):
        ...     pass
        >>> lp.lora_layer_type(Scaled) is LoRAScaled
        True
    """
    if not (isinstance(base_type, type) and issubclass(base_type, nn.Module)):
        raise ConfigError(
            f"register_lora_layer received {base_type!r}; expected an nn.Module subclass "
            "such as nn.Linear. Pass the module class itself, not an instance."
        )

    def decorate(layer_cls: L) -> L:
        from ._layer import LoRALayer

        if not (isinstance(layer_cls, type) and issubclass(layer_cls, LoRALayer)):
            raise ConfigError(
                f"register_lora_layer({base_type.__name__}) decorated {layer_cls!r}; expected a "
                "subclass of loraplug.LoRALayer that implements base_forward, adapter_shapes, "
                "add_lora and add_delta (see docs/extending.md)."
            )
        _REGISTRY[base_type] = layer_cls
        return layer_cls

    return decorate


def register_by_name(qualified_name: str, layer_module: str) -> None:
    """Register an optional package's base type by name, resolved when a model holds one.

    Args:
        qualified_name: ``"package.module.Class"`` as ``cls.__module__ + "." +
            cls.__qualname__`` spells it (e.g. ``"transformers.pytorch_utils.Conv1D"``).
        layer_module: the module whose import registers the layer for that class with
            :func:`register_lora_layer` (e.g. ``"loraplug._conv1d"``).
    """
    _BY_NAME[qualified_name] = layer_module


def _resolve_by_name(ancestor: type) -> None:
    module = _BY_NAME.pop(f"{ancestor.__module__}.{ancestor.__qualname__}", None)
    if module is not None:
        importlib.import_module(module)


def lookup(module_type: type[nn.Module]) -> tuple[type[LoRALayer], type[nn.Module]] | None:
    """The LoRA layer class for ``module_type`` and the registered ancestor it came from."""
    for ancestor in module_type.__mro__:
        if _BY_NAME:
            _resolve_by_name(ancestor)
        layer_cls = _REGISTRY.get(ancestor)
        if layer_cls is not None:
            return layer_cls, ancestor
    return None


def lora_layer_for(module: nn.Module) -> LoRALayer:
    """The LoRA layer that carries ``module``'s adapters.

    A LoRA layer is its own; any other module gets a new layer of its registered class,
    wrapped around it but placed nowhere: injection puts it into the model, while
    checks (valid ranks, adapter shapes) use it as a throw-away probe. A module whose
    weight alone is quantized (torchao keeps ``nn.Linear``) gets the layer its weight's
    format names, a subclass of the registered one.

    Raises:
        TargetError: no LoRA layer is registered for the module's type.
    """
    from ._layer import LoRALayer

    if isinstance(module, LoRALayer):
        return module
    found = lookup(type(module))
    if found is None:
        raise TargetError(
            f"{type_name(type(module))} has no LoRA layer; supported: {supported_types()} and "
            "their subclasses. Register one with loraplug.register_lora_layer."
        )
    layer_cls, registered = found
    from ._quantized import quantized_layer_class

    return quantized_layer_class(module, layer_cls)(module, registered)


def lora_layer_type(module_type: type[nn.Module]) -> type[LoRALayer] | None:
    """Return the LoRA layer class that would wrap ``module_type``, or ``None``.

    Args:
        module_type: a module class, e.g. ``nn.Conv2d`` or a subclass of it.

    Returns:
        The registered layer class of the most specific registered ancestor.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> lp.lora_layer_type(nn.Conv2d).__name__
        'LoRAConv2d'
        >>> lp.lora_layer_type(nn.LayerNorm) is None
        True
    """
    found = lookup(module_type)
    return None if found is None else found[0]


def type_name(module_type: type) -> str:
    """``nn.Linear`` for torch's own modules, ``package.module.Class`` for others."""
    if module_type.__module__.startswith("torch.nn"):
        return f"nn.{module_type.__name__}"
    return f"{module_type.__module__}.{module_type.__qualname__}"


def supported_types() -> list[str]:
    """Names of the registered base types, for error messages."""
    return sorted({*(type_name(t) for t in _REGISTRY), *_BY_NAME})
