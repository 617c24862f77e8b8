"""Mixed adapters in one batch: each row of a batch through its own adapter.

Inside ``with adapter_per_sample(model, names):`` every LoRA layer computes, for row i
of its input (the first dimension),

    y_i = base(x_i) + s_j · B_j A_j x_i,    j = names[i]    (base alone when names[i] is None)

as one batched computation over the adapters stacked for that call: a batched matmul
for Linear and Embedding, one grouped convolution (a group per row) for convolutions.
The stacks are made afresh on every call (nothing derived from a parameter is kept), so
training through the block works and parameters changed inside it are used at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _variants
from ._adapters import check_names, layers_or_raise
from ._errors import ConfigError, StateError
from ._layer import LoRALayer


class Route:
    """Which adapter each row of a batch uses on one layer, and the forward that does it.

    ``slots`` are the distinct adapters of ``names`` this layer carries, in first-use
    order; rows whose adapter the layer lacks (or ``None``) compute the base alone.
    """

    #: Each row its own adapter: no single adapted weight exists (see _owner_reads.py).
    per_row = True

    def __init__(self, names: Sequence[str | None], available: Sequence[str]) -> None:
        slot_of: dict[str, int] = {}
        for n in names:
            if n is not None and n in available and n not in slot_of:
                slot_of[n] = len(slot_of)
        self.rows = len(names)
        self.slots = tuple(slot_of)
        picked = [(i, slot_of[n]) for i, n in enumerate(names) if n is not None and n in slot_of]
        chosen, slot = [i for i, _ in picked], [j for _, j in picked]
        # None for the common cases: every row has an adapter / row i uses slot i.
        self._chosen = None if len(chosen) == self.rows else chosen
        self._slot = None if slot == list(range(len(self.slots))) else slot
        self._indices: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}

    def indices(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """(rows that have an adapter, slot of each of those rows) as index tensors."""
        if device not in self._indices:
            # Normal tensors even when first made under inference_mode: a later call
            # with autograd may save them for backward.
            with torch.inference_mode(False):
                chosen, slot = (
                    None if v is None else torch.tensor(v, dtype=torch.long, device=device)
                    for v in (self._chosen, self._slot))
                self._indices[device] = chosen, slot
        return self._indices[device]

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor:
        """``layer``'s output for ``x`` with each row's own adapter."""
        self._check(layer, x)
        out = layer.base_forward(x)
        found = self._branch(layer, x)
        if found is None:
            return out
        branch, chosen, xs, dropped = found
        if layer._extended and layer._extended.intersection(self.slots):  # DoRA, B's bias
            slot = self.indices(x.device)[1]
            return _variants.routed(layer, out, xs, branch, chosen, slot, self.slots, dropped)
        return out + branch if chosen is None else out.index_add(0, chosen, branch)

    def branch(self, layer: LoRALayer, x: Tensor) -> Tensor | None:
        """The low-rank branch alone for every row (zero where a row has no adapter)."""
        self._check(layer, x)
        found = self._branch(layer, x)
        if found is None:
            return None
        branch, chosen, _, _ = found
        if chosen is None:
            return branch
        return branch.new_zeros((x.shape[0], *branch.shape[1:])).index_add(0, chosen, branch)

    def _check(self, layer: LoRALayer, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[0] != self.rows:
            raise StateError(
                f"adapter_per_sample was given {self.rows} adapter names, one per row, but a "
                f"{type(layer).__name__} received an input of shape {tuple(x.shape)}; every "
                "LoRA layer must see the batch as the first dimension of its input. Pass one "
                "name per row of the batch."
            )
        if layer.merged_adapters:
            raise StateError(
                f"a {type(layer).__name__} was merged inside adapter_per_sample, so its weight "
                "holds adapters; call loraplug.unmerge(model) before running the block."
            )

    def _branch(self, layer: LoRALayer, x: Tensor) -> tuple[
            Tensor, Tensor | None, Tensor, bool] | None:
        # (branch of the rows that have an adapter, those rows' indices or None for all,
        # their input to the branch, whether it went through dropout)
        if not self.slots or layer.adapters_disabled:
            return None
        chosen, slot = self.indices(x.device)
        xs = x if chosen is None else x.index_select(0, chosen)
        a, b = _stacked(layer, self.slots)
        scale = torch.tensor([layer.scaling[n] for n in self.slots], dtype=a.dtype,
                             device=a.device)
        dropped = layer.training and any(layer.dropout[n] for n in self.slots)
        if dropped:
            xs = _dropout_per_row(xs, [layer.dropout[n] for n in self.slots], slot)
        return layer.routed_lora(xs, a, b, scale, slot), chosen, xs, bool(dropped)


def _stacked(layer: LoRALayer, slots: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    # A and B of every slot stacked on a new first dimension (a fresh copy each call, so
    # never stale and differentiable). Smaller ranks are padded with zeros: zero rows of
    # A, zero columns of B, an exact no-op.
    registry: dict[str, Any] = layer._modules  # direct lookups: see LoRALayer._tensor
    store_a, store_b = registry["lora_A"]._parameters, registry["lora_B"]._parameters
    rank = max(layer.rank[n] for n in slots)
    if all(layer.rank[n] == rank for n in slots):
        return torch.stack([store_a[n] for n in slots]), torch.stack([store_b[n] for n in slots])
    a_list, b_list = [], []
    for n in slots:
        a, b = store_a[n], store_b[n]
        # B's columns split A's rows into `split` blocks: 1 when B reads all of A's r
        # channels, g for a grouped B (PEFT's grouped convolutions).
        split = a.shape[0] // b.shape[1]
        extra = (rank - a.shape[0]) // split
        # Per block: A (split, r/split, …) gets rows, B (out, r/split, …) gets columns.
        a_list.append(F.pad(a.reshape(split, a.shape[0] // split, -1), (0, 0, 0, extra))
                      .reshape(rank, *a.shape[1:]))
        b_list.append(F.pad(b.reshape(b.shape[0], b.shape[1], -1), (0, 0, 0, extra))
                      .reshape(b.shape[0], rank // split, *b.shape[2:]))
    return torch.stack(a_list), torch.stack(b_list)


def _dropout_per_row(x: Tensor, p: list[float], slot: Tensor | None) -> Tensor:
    # Each row dropped with its own adapter's p, scaled by 1 / (1 - p) as nn.Dropout does.
    keep = 1.0 - torch.tensor(p, dtype=x.dtype, device=x.device)
    keep = (keep if slot is None else keep[slot]).view(-1, *([1] * (x.dim() - 1)))
    return x * torch.bernoulli(keep.expand_as(x)) / keep


def _refuse_unroutable(layers: list[tuple[str, LoRALayer]]) -> None:
    # Layers whose rows cannot each take their own adapter.
    for what, bad in (
        ("are merged; call loraplug.unmerge(model) first",
         [n for n, layer in layers if layer.merged]),
        ("have adapters disabled (inside disable_adapters); use the block outside it",
         [n for n, layer in layers if layer.adapters_disabled]),
        ("compute through their weight (their class overrides forward, or they adapt a bare "
         "parameter), which cannot differ per row; exclude them when injecting",
         [n for n, layer in layers if layer.forward_differs]),
        ("are of a layer type without routed_lora; implement it to mix adapters per row",
         [n for n, layer in layers if not layer._forms.routed]),
    ):
        if bad:
            raise StateError(f"adapter_per_sample: layers {bad[:5]} {what}.")


@contextmanager
def adapter_per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run row i of each batch through adapter ``names[i]`` inside the block, in place.

    Every LoRA layer computes ``y_i = base(x_i) + s_j · B_j A_j x_i`` with ``j =
    names[i]``, or the base alone for ``None`` and on layers that lack adapter ``j``.
    Rows are the first dimension of each LoRA layer's input, so ``len(names)`` must be
    the batch size. All rows are computed together: per layer, the adapters used are
    stacked and applied by one batched matmul (Linear, Embedding) or one grouped
    convolution (Conv), not by a loop over adapters. Active adapters are ignored inside
    the block; the previous routing comes back after it.

    Args:
        model: a model with LoRA layers, none merged, adapters not disabled.
        names: one adapter name (or ``None``) per row of the batch.

    Raises:
        ConfigError: ``names`` is not a non-empty list of names and ``None``.
        AdapterError: a name is not an adapter of the model.
        StateError: the model has no LoRA layers, some are merged or disabled, or a
            layer computes through its weight (a class that overrides ``forward``) or is of
            a type without ``routed_lora``. Inside the block, a layer whose input has
            another number of rows than ``len(names)`` raises it too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2, name="a")
        >>> _ = lp.inject_lora(model, target="0", rank=2, name="b")
        >>> x = torch.randn(3, 4)
        >>> with lp.adapter_per_sample(model, ["a", "b", None]):
        ...     y = model(x)
        >>> y.shape
        torch.Size([3, 4])
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names \
            or not all(n is None or isinstance(n, str) for n in names):
        raise ConfigError(
            f"adapter_per_sample needs a non-empty list with one adapter name (or None for the "
            f"base model) per row of the batch; received {names!r}. E.g. ['a', 'b', None]."
        )
    layers = layers_or_raise(model, "adapter_per_sample")
    check_names(model, sorted({n for n in names if n is not None}), "adapter_per_sample")
    _refuse_unroutable(layers)
    names = list(names)
    before = [layer._detour for _, layer in layers]
    for _, layer in layers:
        layer._detour = Route(names, layer.adapter_names)
    try:
        yield
    finally:
        for (_, layer), route in zip(layers, before):
            layer._detour = route
