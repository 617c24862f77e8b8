"""Trained modules and token rows in adapter files, under PEFT's keys and config fields.

- ``modules_to_save: [names]``; the copy's tensors under the module's own keys,
  ``<path>.<tensor>`` (PEFT's ``save_pretrained`` writes ``base_model.model.head.weight``);
- ``trainable_token_indices: {embedding: [ids]}``; the rows under
  ``<path>.token_adapter.trainable_tokens_delta`` (k, d).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._errors import LoRAError
from ._extras import TrainedModule, adapter_modules
from ._extras_plan import ExtrasPlan, apply_extras, plan_extras
from ._format import TOKENS_KEY
from ._peft_config import PeftLoRAConfig, matches
from ._targeting import clean_name
from ._tokens import TrainableTokens


def extras_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s trained module copies and token rows under PEFT's keys."""
    state: dict[str, Tensor] = {}
    for path, module in adapter_modules(model):
        path = clean_name(path)
        if isinstance(module, TrainedModule) and name in module.modules_to_save:
            for key, value in module.modules_to_save[name].state_dict().items():
                state[f"{path}.{key}"] = value.detach()
        elif isinstance(module, TrainableTokens) and module.__dict__["tied_to"] is None \
                and name in module.token_indices:
            state[f"{path}.{TOKENS_KEY}"] = module.trainable_tokens_delta[name].detach()
    return state


def extras_config(model: nn.Module, name: str) -> dict[str, object]:
    """The config fields ``modules_to_save`` and ``trainable_token_indices`` of ``name``."""
    saved, tokens = [], {}
    for path, module in adapter_modules(model):
        if isinstance(module, TrainedModule) and name in module.modules_to_save:
            saved.append(clean_name(path))
        elif isinstance(module, TrainableTokens) and module.__dict__["tied_to"] is None \
                and name in module.token_indices:
            tokens[clean_name(path)] = list(module.token_indices[name])
    return {"modules_to_save": sorted(saved) or None, "trainable_token_indices": tokens or None}


@dataclass
class TrainedExtras:
    """A file's trained modules and token rows, checked, with their tensors."""

    plan: ExtrasPlan = field(default_factory=ExtrasPlan)
    copies: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)


def _token_paths(model: nn.Module, config: PeftLoRAConfig) -> dict[str, tuple[int, ...]]:
    tokens = config.token_indices
    if tokens is None or isinstance(tokens, dict):
        return dict(tokens or {})
    # A bare list of ids names the input embedding, as transformers models declare it.
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    names = {id(m): clean_name(n) for n, m in model.named_modules()}
    return {names.get(id(embedding), "<input embeddings>"): tokens}


def read_extras(model: nn.Module, config: PeftLoRAConfig, state: Mapping, others: dict[str, str],
                adapter: str, lora_paths: list[str]) -> tuple[TrainedExtras, list[str]]:
    """Take the keys of trained modules and token rows out of ``others`` and check them."""
    found, problems = TrainedExtras(), []
    modules = {clean_name(n): m for n, m in model.named_modules() if n}
    saved = config.modules_to_save or ()
    trained = [p for p, m in modules.items() if matches(saved, p)
               and not any(p.startswith(q + ".") for q in modules if matches(saved, q))]
    unmatched = [e for e in saved if not any(matches((e,), p) for p in modules)]
    if unmatched:
        problems.append(f"modules_to_save names {unmatched[0]!r}, which matches no module of "
                        "the model; the file was saved for another architecture.")
    tokens = _token_paths(model, config)
    try:
        found.plan = plan_extras(model, name=adapter, modules_to_save=trained or None,
                                 token_indices=tokens or None, lora_paths=lora_paths)
    except LoRAError as err:
        return found, [*problems, str(err)]
    for path in trained:
        module = modules[path]
        own = module.__dict__.get("original_module", module).state_dict()
        keys = {k: others.pop(f"{path}.{k}") for k in own if f"{path}.{k}" in others}
        missing = sorted(set(own) - set(keys))
        if missing:
            problems.append(f"{path}: modules_to_save names it, but the file lacks "
                            f"{[f'{path}.{k}' for k in missing][:5]}.")
        for k, key in keys.items():
            if state[key].shape != own[k].shape:
                problems.append(f"{path}.{k}: shape {tuple(state[key].shape)} in the file, "
                                f"{tuple(own[k].shape)} in the model.")
        found.copies[path] = {k: state[key] for k, key in keys.items()}
    for path, ids in tokens.items():
        key = others.pop(f"{path}.{TOKENS_KEY}", "")
        width = getattr(modules.get(path), "embedding_dim", None)
        if not key:
            problems.append(f"{path}: trainable_token_indices names it, but the file lacks "
                            f"{path}.{TOKENS_KEY}.")
        elif tuple(state[key].shape) != (len(ids), width):
            problems.append(f"{path}.{TOKENS_KEY}: shape {tuple(state[key].shape)}; expected "
                            f"({len(ids)}, {width}) for {len(ids)} token ids.")
        else:
            found.rows[path] = state[key]
    return found, problems


@torch.no_grad()
def fill_extras(model: nn.Module, found: TrainedExtras, adapter: str, *, active: list[str],
                disabled: bool) -> None:
    """Make the trained copies and token rows of ``found`` and copy the file's values in."""
    apply_extras(model, found.plan, adapter, active=active, disabled=disabled)
    modules = {clean_name(n): m for n, m in model.named_modules() if n}
    for path, tensors in found.copies.items():
        copy = modules[path].modules_to_save[adapter]
        own = copy.state_dict()
        for k, value in tensors.items():
            own[k].copy_(value)
    for path, rows in found.rows.items():
        modules[path].trainable_tokens_delta[adapter].copy_(rows)


def state_extras(model: nn.Module, name: str, state: Mapping, others: dict[str, str]) -> tuple[
        list[tuple[Tensor, Tensor]], list[str]]:
    """(target, value) pairs for adapter ``name``'s trained copies and token rows in
    ``state`` (their keys are taken out of ``others``), and the problems found."""
    pairs: list[tuple[Tensor, Tensor]] = []
    problems: list[str] = []
    for path, module in adapter_modules(model):
        path = clean_name(path)
        targets: dict[str, Tensor] = {}
        if isinstance(module, TrainedModule) and name in module.modules_to_save:
            targets = {f"{path}.{k}": v for k, v in
                       module.modules_to_save[name].state_dict().items()}
        elif isinstance(module, TrainableTokens) and module.__dict__["tied_to"] is None \
                and name in module.token_indices:
            targets = {f"{path}.{TOKENS_KEY}": module.trainable_tokens_delta[name]}
        for key, target in targets.items():
            found = others.pop(key, "")
            if not found:
                problems.append(f"{path}: missing key {key} of adapter {name!r}.")
            elif state[found].shape != target.shape:
                problems.append(f"{key}: shape {tuple(state[found].shape)} in the state; the "
                                f"adapter's is {tuple(target.shape)}.")
            else:
                pairs.append((target, state[found]))
    return pairs, problems


@torch.no_grad()
def merged_extras_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """``state`` (the model's) as the plain model with active copies and rows in place."""
    for path, module in adapter_modules(model):
        prefix = f"{path}." if path else ""
        for key in [k for k in state if k.startswith(prefix)
                    and k[len(prefix):].split(".")[0] in
                    ("modules_to_save", "trainable_tokens_delta", "trainable_tokens_original")]:
            del state[key]
        if isinstance(module, TrainedModule):
            chosen = module.module_for(merged=True)
            for key, value in chosen.state_dict().items():
                state[prefix + key] = value
        elif isinstance(module, TrainableTokens) and not module.owner.merged:
            owner = module.owner  # a tied head takes the embedding's rows
            names = () if owner.adapters_disabled else owner.held_active
            if names:
                _, ids = owner._rows(names, owner._weight.device)
                state[prefix + "weight"] = owner._weight.index_copy(
                    0, ids, owner._values(names).to(owner._weight.dtype))
