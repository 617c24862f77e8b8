"""Layer types written against the named forms ``lora_forward(x, name)`` and ``delta_weight(name)``.

Before the tensor hooks (``add_lora``, ``add_delta``), a layer type defined its math by
those two methods; ``LoRALayer`` derives them now, and a subclass may still redefine them.
Such a definition, where it is more specific than the class's ``add_lora`` /
``add_delta``, is the layer's math: the forward adds ``lora_forward`` to the base output
(:class:`NamedBranch`) and merges add ``delta_weight``. A ``routed_lora`` inherited from
above it would compute another branch, so ``adapter_per_sample`` refuses the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from ._layer import LoRALayer


class Forms(NamedTuple):
    """Where a layer class's math comes from: the named forms, or the tensor hooks."""

    named_branch: bool  #: lora_forward(x, name) is more specific than add_lora
    named_delta: bool  #: delta_weight(name) is more specific than add_delta
    routed: bool  #: routed_lora computes the branch in use


def _first_definition(cls: type, *names: str) -> tuple[type, str]:
    # The most specific class in cls's MRO that defines one of names, and which one
    # (LoRALayer defines them all).
    return next((klass, name) for klass in cls.__mro__ for name in names if name in vars(klass))


def forms_of(cls: type[LoRALayer]) -> Forms:
    """The :class:`Forms` of a layer class, resolved along its MRO (once per layer)."""
    branch_owner, branch = _first_definition(cls, "add_lora", "lora_forward")
    _, delta = _first_definition(cls, "add_delta", "delta_weight")
    routed_owner, _ = _first_definition(cls, "routed_lora")
    from ._layer import LoRALayer  # its own routed_lora only raises

    routed = routed_owner is not LoRALayer and issubclass(routed_owner, branch_owner)
    return Forms(branch == "lora_forward", delta == "delta_weight", routed)


class NamedBranch:
    """The forward of a layer type whose branch is ``lora_forward(x, name)``."""

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor:
        if layer.through_weight:
            return layer._forward_through_weight(x, layer._live, layer.scaling)
        out = layer.base_forward(x)
        for name in layer._live:
            dropped = layer.lora_dropout[name](x) if layer.training and layer.dropout[name] else x
            out = out + layer.lora_forward(dropped, name)
        return out
