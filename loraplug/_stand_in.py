"""A module that takes another module's place in the model, under the same state-dict keys.

LoRA layers, the hosts of bare parameters and the wrappers of trained modules and token
rows all stand in for a module: they register its parameters, buffers and children under
their own names (so ``state_dict`` keys do not change), keep the module itself
unregistered in ``__dict__`` (``unload`` puts it back), point it at their current tensors
after ``.to()`` and the like, follow its train/eval mode, and read its other attributes
(``in_features``, ``num_experts``, ...) through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn


class StandIn(nn.Module):
    """Base of the modules that stand in for another (see the module docstring)."""

    #: Where the module stood in for is kept in ``__dict__``.
    base_key: ClassVar[str] = "base_layer"
    #: Whether that module's children are pointed back too (not for a LoRA layer, whose
    #: children may be the LoRA layers of its parts).
    sync_children: ClassVar[bool] = False

    def adopt(self, base: nn.Module) -> None:
        """Take ``base``'s place: its tensors and children, ahead of this module's own."""
        self.__dict__[self.base_key] = base
        self._parameters.update(base._parameters)
        self._buffers.update(base._buffers)
        self._non_persistent_buffers_set |= base._non_persistent_buffers_set
        self._modules = {**base._modules, **self._modules}
        self.training = base.training

    def sync_base(self) -> None:
        """Point the module stood in for at this module's current tensors (and children)."""
        base = self.__dict__[self.base_key]
        registries = ("_parameters", "_buffers", "_modules") if self.sync_children \
            else ("_parameters", "_buffers")
        for registry in registries:
            mine, theirs = self.__dict__[registry], base.__dict__[registry]
            for key in theirs:
                theirs[key] = mine[key]
        base.training = self.training

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StandIn:
        super()._apply(fn, recurse)
        self.sync_base()
        return self

    def train(self, mode: bool = True) -> StandIn:
        super().train(mode)
        self.__dict__[self.base_key].train(mode)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get(self.base_key)
            if base is None:
                raise
            return getattr(base, name)
