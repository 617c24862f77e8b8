"""Trainable token rows: an adapter trains chosen rows of an embedding, nothing else of it.

PEFT's ``trainable_token_indices``: for token ids ``I`` (new special tokens, say) the
adapter holds their rows ``E_I`` (k, d), initialised from the embedding's own, and the
layer computes with the embedding ``W`` whose rows ``I`` are replaced by ``E_I``:

    y = W'[ids],    W'[i] = E_I[j] if i = I[j] else W[i].

An output layer that shares the embedding's weight (a tied language-model head,
``y = x W'ᵀ + b``) is wrapped too and computes with the same rows, so the tie holds.
Rows are replaced in the output, never by copying W: a lookup costs O(ids·d), a tied
head O(batch·k·d) beyond its own product. ``merge`` writes ``E_I`` into W's rows; the
original rows are kept in the buffer ``trainable_tokens_original.<name>`` (saved with
the model), so ``unmerge`` restores them exactly, after a restart too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dora import BufferDict
from ._extras import AdapterModule


class TrainableTokens(AdapterModule):
    """An ``nn.Embedding`` (or a tied ``nn.Linear`` head) whose rows ``indices`` train.

    Attributes:
        token_indices: adapter name -> the token ids it trains.
        trainable_tokens_delta: adapter name -> their rows (k, d) (PEFT's name: the
            values, not differences).
        trainable_tokens_original: adapter name -> the original rows, for ``unmerge``.
        tied_to: for a tied head, the embedding's wrapper whose rows it shares.
    """

    def __init__(self, original: nn.Module, tied_to: TrainableTokens | None = None) -> None:
        super().__init__(original)
        self.__dict__["tied_to"] = tied_to
        self.token_indices: dict[str, tuple[int, ...]] = {}
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = BufferDict()
        self._slots: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}

    @property
    def _weight(self) -> Tensor:
        return cast(Tensor, self._parameters["weight"])

    @property
    def owner(self) -> TrainableTokens:
        return self.__dict__["tied_to"] or self

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.owner.token_indices)

    def adapter_parameters(self) -> list[nn.Parameter]:
        if self.__dict__["tied_to"] is not None:
            return []
        return list(self.trainable_tokens_delta.values())

    def add_rows(self, name: str, indices: Iterable[int], values: Tensor | None = None) -> None:
        """Train rows ``indices`` for adapter ``name``, starting from the weight's own."""
        weight = self._weight
        index = torch.tensor(list(indices), dtype=torch.long, device=weight.device)
        original = weight.detach().index_select(0, index)
        start = original if values is None else values.to(weight.dtype)
        self.token_indices[name] = tuple(int(i) for i in indices)
        self.trainable_tokens_delta[name] = nn.Parameter(start.clone(), requires_grad=True)
        self.trainable_tokens_original[name] = original.clone()
        self._slots.clear()

    def remove_adapter(self, name: str) -> None:
        if self.__dict__["tied_to"] is None:
            del self.trainable_tokens_delta[name]
            del self.trainable_tokens_original[name]
            del self.token_indices[name]
        self._slots.clear()

    def active_problem(self, names: Iterable[str]) -> str | None:
        seen: dict[int, str] = {}
        for name in names:
            for i in self.owner.token_indices.get(name, ()):
                if i in seen:
                    return (f"adapters {seen[i]!r} and {name!r} both train token {i} of this "
                            "embedding; activate one of them at a time.")
                seen[i] = name
        return None

    def set_active(self, names: Iterable[str], *, while_merged: bool = False) -> None:
        self.active_adapters = tuple(names)
        self._slots.clear()

    def _rows(self, names: tuple[str, ...], device: torch.device) -> tuple[Tensor, Tensor]:
        # (slot of every vocabulary id: -1 or its row in the concatenated values, the ids).
        owner = self.owner
        key = (*names, str(device))
        if key not in self._slots:
            vocab = self._weight.shape[0]
            slot = torch.full((vocab,), -1, dtype=torch.long)
            ids = [i for n in names for i in owner.token_indices[n]]
            slot[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
            with torch.inference_mode(False):
                self._slots[key] = (slot.to(device), torch.tensor(ids, device=device))
        return self._slots[key]

    def _values(self, names: tuple[str, ...]) -> Tensor:
        params = self.owner.trainable_tokens_delta
        return torch.cat([params[n] for n in names]) if len(names) > 1 else params[names[0]]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        original = self.__dict__["original_module"]
        out = original(x, *args, **kwargs)
        names = () if self.owner.adapters_disabled or self.owner.merged_adapters \
            else self.owner.held_active
        if not names:
            return out
        values = self._values(names)
        slot, ids = self._rows(names, out.device)
        if isinstance(original, nn.Embedding):
            rows = slot[x]
            hit = rows >= 0
            # Misses look up an extra zero row, so scale_grad_by_freq counts hits alone.
            table = torch.cat([values, values.new_zeros(1, values.shape[1])])
            picked = F.embedding(torch.where(hit, rows, len(values)), table, None, None, 2.0,
                                 original.scale_grad_by_freq)
            return torch.where(hit.unsqueeze(-1), picked.to(out.dtype), out)
        # A tied head y = x Wᵀ + b: the columns of the trained ids come from the rows.
        bias = original.bias
        columns = F.linear(x, values, None if bias is None else bias.index_select(0, ids))
        return out.index_copy(-1, ids, columns.to(out.dtype))

    def merge(self, *, safe: bool = False) -> None:
        """Write the active rows into the weight (the tied head sees them through the tie)."""
        names = self.held_active
        if self.__dict__["tied_to"] is None and names:
            _, ids = self._rows(names, self._weight.device)
            with torch.no_grad():
                self._weight.index_copy_(0, ids, self._values(names).detach().to(
                    self._weight.dtype))
        self.merged_adapters = names

    def unmerge(self) -> None:
        names = self.merged_adapters
        if self.__dict__["tied_to"] is None and names:
            _, ids = self._rows(names, self._weight.device)
            originals = torch.cat([self.trainable_tokens_original[n] for n in names])
            with torch.no_grad():
                self._weight.index_copy_(0, ids, originals.to(
                    self._weight.dtype))
        self.merged_adapters = ()

    def module_for(self, merged: bool) -> nn.Module:
        """The original module (its weight holds the rows when merged)."""
        self.sync_base()
        return self.__dict__["original_module"]

    def extra_repr(self) -> str:
        rows = {n: list(i) for n, i in self.owner.token_indices.items()}
        return f"trainable rows: {rows}" + (" (tied)" if self.__dict__["tied_to"] else "")
