"""What an adapter trains beside its low-rank layers: whole modules and embedding rows.

An adapter may carry, besides LoRA layers, modules trained in full (PEFT's
``modules_to_save``: a new classification head, say) and single rows of an embedding
(PEFT's ``trainable_token_indices``). Both are wrappers put in the model in place of the
original module, like LoRA layers, and follow the same adapter state: each adapter has
its own copy or rows, ``set_adapter`` switches them, ``disable_adapters`` shows the
original, ``unload`` puts the original (or, with ``merge=True``, the adapted) module back.

A wrapper registers the original module's tensors and children under their own names,
so the base model's ``state_dict`` keys do not change; the adapters' tensors are added
beside them (``<path>.modules_to_save.<name>.…``, ``<path>.trainable_tokens_delta.<name>``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

from ._stand_in import StandIn


class AdapterModule(StandIn):
    """Base of the wrappers that carry non-low-rank parts of adapters.

    Subclasses keep per-adapter state keyed by name and implement ``_forward_active``.
    """

    base_key = "original_module"  # PEFT's name
    sync_children = True

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.adopt(original)
        self.active_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False
        self.merged_adapters: tuple[str, ...] = ()

    # Subclasses: the adapter names they hold.
    @property
    def adapter_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters the adapters train here."""
        raise NotImplementedError

    @property
    def held_active(self) -> tuple[str, ...]:
        return tuple(n for n in self.active_adapters if n in self.adapter_names)

    def active_problem(self, names: Iterable[str]) -> str | None:
        """Why ``names`` cannot be active together here, or ``None``."""
        return None

    def set_active(self, names: Iterable[str], *, while_merged: bool = False) -> None:
        self.active_adapters = tuple(names)

    def set_disabled(self, disabled: bool) -> None:
        self.adapters_disabled = bool(disabled)

    def live(self) -> tuple[str, ...]:
        """The adapters the forward computes now."""
        if self.adapters_disabled or self.merged_adapters:
            return ()
        return self.held_active


class TrainedModule(AdapterModule):
    """A module trained in full by each adapter: one copy per adapter, the original kept.

    ``forward`` runs the copy of the active adapter that has one (the original when
    adapters are disabled, or when no active adapter trains this module). The copies
    live in ``modules_to_save`` (PEFT's name): ``state_dict`` keys
    ``<path>.modules_to_save.<adapter>.<tensor>``.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__(original)
        self.modules_to_save = nn.ModuleDict()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save.keys())

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.modules_to_save.parameters())

    def add_copy(self, name: str) -> nn.Module:
        """A fresh trainable copy of the original module for adapter ``name``."""
        self.sync_base()
        duplicate = copy.deepcopy(self.__dict__["original_module"])
        duplicate.requires_grad_(True)
        self.modules_to_save[name] = duplicate
        return duplicate

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    def active_problem(self, names: Iterable[str]) -> str | None:
        holding = [n for n in names if n in self.modules_to_save]
        if len(holding) > 1:
            return (f"adapters {holding} each train their own copy of this module, and only "
                    "one copy can compute it; activate one of them at a time.")
        return None

    def merge(self, *, safe: bool = False) -> None:
        """Record the active copy as merged (its forward stays the copy's)."""
        self.merged_adapters = self.held_active

    def unmerge(self) -> None:
        self.merged_adapters = ()

    def module_for(self, merged: bool) -> nn.Module:
        """The module ``unload`` puts back: the active copy when ``merged``, else the original."""
        self.sync_base()
        held = self.held_active
        if merged and held and not self.adapters_disabled:
            return self.modules_to_save[held[0]]
        return self.__dict__["original_module"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        held = () if self.adapters_disabled else self.held_active
        if held:
            return self.modules_to_save[held[0]](*args, **kwargs)
        return self.__dict__["original_module"](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"trained copies: {list(self.adapter_names)}"


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """(name, wrapper) for each trained-module or token-row wrapper in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterModule)]


def unwrap_modules(model: nn.Module, *, merge: bool) -> None:
    """Put back the modules the wrappers replaced: the active copy (trained modules) or
    the weight with the active rows (token rows) when ``merge``, else the originals."""
    wrappers = [m for _, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, AdapterModule)]
    for wrapper in dict.fromkeys(wrappers):
        if merge and not wrapper.adapters_disabled:
            wrapper.merge()
        else:
            wrapper.unmerge()
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, AdapterModule):
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, module.module_for(merge))
