"""One layer's merged adapters: a stack of folds, each undone bit for bit.

Each LoRA layer keeps a stack of folds: the adapters one merge added to W, in order,
each with the residual that gives W back exactly (see ``_exact``). Unmerging adapters
that lie under others takes the folds above them off first, then puts the others back:
the weight is then bit for bit what merging those others alone gives. A sum with NaN
or inf is refused before the weight is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._errors import LoRAWarning, StateError
from ._exact import NotFinite, Residual, fold, subtract, unfold
from ._products import compute_dtype
from ._weights import weight_home, write_weight

if TYPE_CHECKING:
    from ._layer import LoRALayer


@dataclass
class Fold:
    """Adapters one merge added to a layer's weight, and how to take them out exactly."""

    names: tuple[str, ...]
    residual: Residual | None  # None: kept without it (exact=False), taken out plainly


def delta_of(layer: LoRALayer, names: Sequence[str]) -> Tensor:
    """``Σ s·ΔW`` over ``names`` in compute_dtype: the same bits every time it is asked."""
    weight = layer._tensor("weight")
    delta = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device)
    layer._accumulate(delta, names, layer.scaling, 1)
    return delta


def _sync(layer: LoRALayer) -> None:
    layer.merged_adapters = tuple(n for f in layer._folds for n in f.names)
    layer._refresh()


_NOT_FINITE = ("merging {names} gives a weight with NaN or inf values (NaN or inf in the "
               "adapter tensors, or an overflow of the weight's dtype); the weight was left as "
               "it was. Check the adapters with torch.isfinite(...).all().")


@torch.no_grad()
def push(layer: LoRALayer, names: tuple[str, ...], *, exact: bool = True) -> None:
    """Fold ``names`` into the layer's weight; refused, weight untouched, if not finite.

    A parametrized weight (``_weights``) is written through its parametrization, without
    a residual: unmerging it subtracts ΔW.
    """
    residual = None
    if weight_home(layer) == "stored":
        try:
            residual = fold(layer.weight, delta_of(layer, names))
        except NotFinite:
            raise StateError(_NOT_FINITE.format(names=list(names))) from None
    else:
        new = layer._adapted_weight(names, layer.scaling, 1)
        if not torch.isfinite(new).all():
            raise StateError(_NOT_FINITE.format(names=list(names)))
        write_weight(layer, new)
    layer._folds.append(Fold(names, residual if exact else None))
    _sync(layer)


@torch.no_grad()
def pop(layer: LoRALayer) -> Fold:
    """Take the last fold out of the layer's weight: exactly, when it kept its residual."""
    top = layer._folds.pop()
    if weight_home(layer) != "stored":
        write_weight(layer, layer._adapted_weight(top.names, layer.scaling, -1))
        _sync(layer)
        return top
    weight = layer.weight
    delta = delta_of(layer, top.names)
    if top.residual is None:
        subtract(weight, delta)
    elif not unfold(weight, delta, top.residual):
        warnings.warn(
            f"unmerging {list(top.names)} did not give the weight back bit for bit: the "
            "weight, the adapters or their scaling changed while merged (or ΔW was computed "
            "on another device or with other thread settings). The adapters were subtracted.",
            LoRAWarning, stacklevel=4)
    _sync(layer)
    return top


def take_out(layer: LoRALayer, names: Sequence[str]) -> None:
    """Unmerge ``names`` from the layer, re-merging the adapters that lay above them.

    Raises StateError, with the layer as it was, when what is re-merged is not finite
    on its own.
    """
    wanted = set(names) & set(layer.merged_adapters)
    popped: list[Fold] = []
    while wanted & {n for f in layer._folds for n in f.names}:
        popped.append(pop(layer))
    pushed = 0
    try:
        for top in reversed(popped):
            keep = tuple(n for n in top.names if n not in wanted)
            if keep:
                push(layer, keep, exact=top.residual is not None)
                pushed += 1
    except StateError:
        for _ in range(pushed):
            pop(layer)
        for top in reversed(popped):
            push(layer, top.names, exact=top.residual is not None)
        raise


def names_to_merge(layer: LoRALayer, names: Sequence[str] | None) -> tuple[str, ...]:
    """The adapters a merge adds here: ``names`` (default: the active ones) it holds, unmerged."""
    wanted = layer.held_active if names is None else names
    return tuple(n for n in wanted if n in layer.rank and n not in layer.merged_adapters)
