"""A new adapter's trained modules and token rows: checked first, then made.

``inject_lora(modules_to_save=..., trainable_token_indices=...)`` and ``load_adapter``
put :class:`TrainedModule` and :class:`TrainableTokens` wrappers in the model through
:func:`plan_extras` (every check, nothing changed) and :func:`apply_extras`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from torch import nn

from ._errors import ConfigError, TargetError
from ._extras import AdapterModule, TrainedModule
from ._layer import LoRALayer
from ._targeting import clean_name
from ._tokens import TrainableTokens


@dataclass
class ExtrasPlan:
    """Where a new adapter's trained modules and token rows go, checked, not yet made."""

    trained: dict[str, nn.Module] = field(default_factory=dict)
    #: embedding path -> (embedding or its wrapper, token ids, paths of tied heads)
    tokens: dict[str, tuple[nn.Module, tuple[int, ...], list[str]]] = field(default_factory=dict)


def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return {clean_name(n): m for n, m in model.named_modules() if n}


def _trained_plan(model: nn.Module, patterns: Sequence[str], name: str,
                  lora_paths: Sequence[str]) -> dict[str, nn.Module]:
    modules = _module_names(model)
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        found = [p for p in modules if fnmatch.fnmatchcase(p, pattern)]
        if not found:
            close = difflib.get_close_matches(pattern, list(modules), n=3)
            raise TargetError(
                f"modules_to_save entry {pattern!r} matches no module of the model"
                + (f"; close names: {close}." if close else ".")
                + " Entries are full module names or globs, e.g. 'classifier' or 'heads.*'.")
        chosen.update((p, modules[p]) for p in found)
    # The outermost module of nested matches; a module inside a wrapper is the wrapper's.
    outer = {p: m for p, m in chosen.items()
             if not any(p.startswith(q + ".") for q in chosen) and ".modules_to_save." not in p}
    for path, module in outer.items():
        clash = [q for q in lora_paths if q == path or q.startswith(path + ".")
                 or path.startswith(q + ".")]
        if clash or isinstance(module, LoRALayer):
            raise TargetError(
                f"modules_to_save: {path!r} is trained in full, but {clash or [path]} carry "
                "LoRA adapters, which a copy of the whole module would hide; take it out of "
                "target or out of modules_to_save.")
        if isinstance(module, TrainedModule) and name in module.adapter_names:
            raise ConfigError(f"modules_to_save: {path!r} already has a copy for adapter "
                              f"{name!r}; delete the adapter first.")
    return outer


def _tokens_plan(model: nn.Module, indices: Mapping[str, Sequence[int]], name: str,
                 lora_paths: Sequence[str]) -> dict[str, tuple[nn.Module, tuple[int, ...],
                                                             list[str]]]:
    modules = _module_names(model)
    plan = {}
    for path, ids in indices.items():
        module = modules.get(path)
        original = module.__dict__["original_module"] if isinstance(module, TrainableTokens) \
            else module
        if not isinstance(original, nn.Embedding) or path in lora_paths:
            what = "no module" if module is None else f"a {type(module).__name__}"
            raise TargetError(
                f"trainable_token_indices: {path!r} is {what}; expected an nn.Embedding "
                "without a LoRA adapter (the rows of a tied output layer follow it)."
                + close_names(path, modules))
        vocab = original.num_embeddings
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab
                for i in ids) or len(set(ids)) != len(ids):
            raise ConfigError(
                f"trainable_token_indices[{path!r}] is {ids!r}; expected a non-empty list of "
                f"distinct token ids in [0, {vocab}).")
        if isinstance(module, TrainableTokens) and name in module.adapter_names:
            raise ConfigError(f"trainable_token_indices: {path!r} already trains rows for "
                              f"adapter {name!r}; delete the adapter first.")
        tied = [p for p, m in modules.items() if p != path and not p.startswith(path + ".")
                and m._parameters.get("weight") is original.weight]
        odd = [p for p in tied if p in lora_paths or not isinstance(
            modules[p].__dict__.get("original_module", modules[p]), nn.Linear)]
        if odd:
            raise TargetError(
                f"trainable_token_indices: {path!r} shares its weight with {odd}, which "
                "cannot follow the trained rows (a LoRA layer, or not an nn.Linear head); "
                "leave those out of target, or untie the weights.")
        plan[path] = (cast(nn.Module, module), tuple(ids), tied)
    return plan


def close_names(path: str, modules: Mapping[str, nn.Module]) -> str:
    close = difflib.get_close_matches(path, list(modules), n=3)
    return f" Close names: {close}." if close else ""


def plan_extras(model: nn.Module, *, name: str, modules_to_save: Sequence[str] | None,
                token_indices: Mapping[str, Sequence[int]] | None,
                lora_paths: Sequence[str]) -> ExtrasPlan:
    """Check where adapter ``name``'s trained modules and token rows go; nothing changes."""
    plan = ExtrasPlan()
    if modules_to_save is not None:
        if isinstance(modules_to_save, str) or not isinstance(modules_to_save, Sequence) \
                or not all(isinstance(p, str) for p in modules_to_save):
            raise ConfigError(f"modules_to_save must be a list of module names or globs; "
                              f"received {modules_to_save!r}, e.g. ['classifier'].")
        plan.trained = _trained_plan(model, modules_to_save, name, lora_paths)
    if token_indices is not None:
        if not isinstance(token_indices, Mapping):
            raise ConfigError(f"trainable_token_indices must map embedding names to token "
                              f"ids; received {token_indices!r}, e.g. {{'embed': [0, 7]}}.")
        plan.tokens = _tokens_plan(model, token_indices, name, lora_paths)
    return plan


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and path:
            parent_path, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)


def apply_extras(model: nn.Module, plan: ExtrasPlan, name: str, *,
                 active: Sequence[str], disabled: bool) -> None:
    """Make the copies and rows of ``plan`` for adapter ``name``."""
    modules = _module_names(model)
    made: list[AdapterModule] = []
    for module in plan.trained.values():
        trained = module if isinstance(module, TrainedModule) else TrainedModule(module)
        trained.add_copy(name)
        made.append(trained)
        if trained is not module:
            _replace(model, module, trained)
    for module, ids, tied in plan.tokens.values():
        tokens = module if isinstance(module, TrainableTokens) else TrainableTokens(module)
        tokens.add_rows(name, ids)
        made.append(tokens)
        if tokens is not module:
            _replace(model, module, tokens)
        for head_path in tied:
            head = modules[head_path]
            if not isinstance(head, TrainableTokens):
                wrapped = TrainableTokens(head, tied_to=tokens)
                _replace(model, head, wrapped)
                made.append(wrapped)
    for wrapper in made:
        wrapper.set_active(active)
        wrapper.set_disabled(disabled)
