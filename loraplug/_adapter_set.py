"""The named adapters one LoRA layer carries, and which of them it computes.

:class:`AdapterSet` is the bookkeeping half of :class:`loraplug.LoRALayer`, free of any
math: A and B of each adapter (``lora_A``, ``lora_B``), its rank, alpha, scaling and
dropout, the active, merged and disabled state, and ``_live``, the adapters the forward
computes, resolved whenever that state changes rather than on every call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from . import _variants
from ._compile import sync_gates
from ._errors import ConfigError, StateError

#: Adapters are keys of these containers; torch refuses keys that shadow their attributes.
_CONTAINERS = (nn.ParameterDict(), nn.ModuleDict())


def usable_name(name: object) -> bool:
    """Whether ``name`` can name an adapter, that is, key its parameters and modules.

    Any non-empty string without dots that is not an attribute of ``nn.ParameterDict``
    or ``nn.ModuleDict`` (``keys``, ``copy``, ``training``, ``__init__``, ...).
    """
    return isinstance(name, str) and bool(name) and "." not in name \
        and not any(hasattr(c, name) for c in _CONTAINERS)

if TYPE_CHECKING:
    from ._folds import Fold

_LIVE_HOOK = "loraplug.live"


def live_marker(module: nn.Module, args: object) -> None:
    """A forward pre-hook that does nothing: its presence marks a layer with live adapters."""


class AdapterSet(nn.Module):
    """Named low-rank adapters and their state; :class:`loraplug.LoRALayer` adds the math."""

    supports_dropout: ClassVar[bool]  # set by LoRALayer
    _lora_scales: Tensor  # the gates of the compiled forward: see _compile.py

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.dropout: dict[str, float] = {}
        #: adapter name -> its initialisation; for those that rewrote the base weight,
        #: the initial (A₀, B₀) on the CPU, to write the adapter against the original W.
        self.init: dict[str, str] = {}
        self.initial_values: dict[str, tuple[Tensor, Tensor]] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()  # in the weight, in merge order
        self._folds: list[Fold] = []  # how they were merged: see _folds.py
        self.adapters_disabled = False
        self._live: tuple[str, ...] = ()  # what the forward computes

    def add_adapter(
        self, name: str, a: Tensor, b: Tensor, *, alpha: float, dropout: float,
        use_rslora: bool = False,
    ) -> None:
        """Attach adapter ``name`` with tensors ``a``, ``b`` (already validated).

        The scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

        Raises:
            ConfigError: ``name`` cannot name an adapter (see :func:`usable_name`).
        """
        if not usable_name(name):  # checked first: a refused key leaves nothing behind
            raise ConfigError(f"{name!r} cannot name an adapter; see loraplug.inject_lora.")
        rank = a.shape[0]
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        p = dropout if self.supports_dropout else 0.0
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.rank[name] = rank
        self.use_rslora[name] = bool(use_rslora)
        self.dropout[name] = p
        self.set_scale(name, alpha)
        self._refresh()

    @torch.no_grad()
    def load_tensors(self, name: str, a: Tensor, b: Tensor) -> None:
        """Give adapter ``name`` the values ``a``, ``b`` from ``file_tensors``, in its
        dtype and on its device; a layout of other shapes replaces its parameters."""
        for registry, value in ((self.lora_A, a), (self.lora_B, b)):
            current = registry[name]
            if current.shape == value.shape:
                current.copy_(value)
            else:
                value = value.to(device=current.device, dtype=current.dtype).clone()
                registry[name] = nn.Parameter(value, requires_grad=current.requires_grad)
        self._refresh()

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (the layer must not have it merged)."""
        if name in self.merged_adapters:
            raise StateError(
                f"adapter {name!r} is merged into this layer's weight; call unmerge() first."
            )
        for registry in (self.lora_A, self.lora_B, self.lora_dropout):
            del registry[name]
        for store in (self.rank, self.alpha, self.scaling, self.use_rslora, self.dropout):
            del store[name]
        self.init.pop(name, None)
        self.initial_values.pop(name, None)
        _variants.remove(self, name)  # type: ignore[arg-type]
        self._refresh()

    def set_scale(self, name: str, alpha: float) -> None:
        """Change adapter ``name``'s alpha (and so its scaling ``alpha / r``).

        Raises:
            ConfigError: ``alpha`` is not a finite number > 0 (as ``inject_lora`` asks).
            StateError: the adapter is merged.
        """
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
                or not 0 < alpha < math.inf:
            raise ConfigError(f"alpha must be a finite number > 0; received {alpha!r}.")
        if name in self.merged_adapters:
            raise StateError(f"adapter {name!r} is merged; call unmerge() before changing alpha.")
        self.alpha[name] = float(alpha)
        rank = self.rank[name]
        self.scaling[name] = float(alpha) / (math.sqrt(rank) if self.use_rslora[name] else rank)
        sync_gates(self)

    def set_active(self, names: Iterable[str], *, while_merged: bool = False) -> None:
        """Ask for ``names`` to be computed; names this layer lacks are ignored.

        Refused while adapters are merged (they act through the weight whatever is
        active), unless ``while_merged``: ``delete_adapter`` drops an unmerged name.
        """
        if self.merged_adapters and not while_merged:
            raise StateError(
                f"this layer has {list(self.merged_adapters)} merged; unmerge before "
                "switching adapters."
            )
        self.active_adapters = tuple(names)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        """Compute the base module alone while ``disabled`` is true."""
        if disabled and self.merged_adapters:
            raise StateError(
                f"this layer has {list(self.merged_adapters)} merged into its weight; "
                "unmerge before disabling adapters."
            )
        self.adapters_disabled = bool(disabled)
        self._refresh()

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every trained parameter of every adapter: A, B, DoRA magnitudes, B's biases."""
        params: list[nn.Parameter] = [*self.lora_A.values(), *self.lora_B.values()]
        for key in ("lora_magnitude_vector", "lora_B_bias"):
            params += [p for p in _variants.registry(self, key).values()
                       if isinstance(p, nn.Parameter)]
        return params

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of the adapters this layer carries, in the order they were added."""
        return tuple(self.rank)

    @property
    def merged(self) -> bool:
        """Whether any adapter is folded into ``weight``."""
        return bool(self.merged_adapters)

    @property
    def held_active(self) -> tuple[str, ...]:
        """The active adapters this layer holds, in activation order, merged or not."""
        return tuple(n for n in self.active_adapters if n in self.rank)

    def _refresh(self) -> None:
        # The adapters the forward computes, resolved once here instead of every call:
        # the active ones not merged into the weight (merged ones act through it).
        merged = self.merged_adapters
        self._live = () if self.adapters_disabled else tuple(
            n for n in self.held_active if n not in merged)
        # nn.TransformerEncoderLayer runs a fused kernel on its children's weights unless
        # one of its modules has a forward hook: while an adapter is live, lora_A (never
        # called, so the hook costs nothing) carries one and keeps that kernel off.
        hooks = self.lora_A._forward_pre_hooks
        if self._live:
            hooks[_LIVE_HOOK] = live_marker  # type: ignore[index]
        else:
            hooks.pop(_LIVE_HOOK, None)  # type: ignore[call-overload]
        sync_gates(self)
