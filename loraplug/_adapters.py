"""Model-level adapter state: which adapters exist, which are active, merged or disabled.

Every function here acts in place on the LoRA layers of a model and checks the whole
model before changing any layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import nn

from ._distributed import refuse_sharded
from ._errors import AdapterError, StateError
from ._folds import push, take_out
from ._layer import LoRALayer
from ._targeting import check_model, clean_name
from ._weights import merge_problem, shared_memory, staging_problem, weight_home

if TYPE_CHECKING:
    pass


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """(name, layer) for each LoRA layer in ``model``, each layer once, in module order.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``.
    """
    check_model(model)
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def layers_or_raise(model: nn.Module, action: str) -> list[tuple[str, LoRALayer]]:
    layers = lora_layers(model)
    if not layers:
        raise StateError(
            f"{action}: the model ({type(model).__name__}) has no LoRA layers; call "
            "loraplug.inject_lora(model, target=..., rank=...) or load_adapter first."
        )
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Return the names of all adapters in ``model``, sorted.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> _ = lp.inject_lora(model, target="1", rank=2, name="head")
        >>> lp.adapter_names(model)
        ['default', 'head']
    """
    return sorted({n for _, layer in lora_layers(model) for n in layer.adapter_names})


def active_adapters(model: nn.Module) -> list[str]:
    """Return the names of the active adapters, in the order they were set.

    Args:
        model: any model; one without LoRA layers has no active adapters.

    Returns:
        The names :func:`set_adapter` made active (the first adapter by default).

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> lp.active_adapters(model)
        []
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> lp.active_adapters(model)
        ['default']
    """
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    return []


def check_names(model: nn.Module, names: Sequence[str], action: str) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        close = sorted({c for n in unknown for c in difflib.get_close_matches(str(n), known)})
        hint = f" Did you mean {close}?" if close else ""
        raise AdapterError(
            f"{action}: unknown adapter name(s) {unknown}; the model has {known}.{hint}"
        )


def _name_list(names: object, action: str) -> list[str]:
    """``names`` as a list of distinct names, in order (a name listed twice counts once)."""
    listed = [names] if isinstance(names, str) else names
    if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
        raise AdapterError(
            f"{action}: expected an adapter name or a list of names; received {names!r}."
        )
    return list(dict.fromkeys(listed))


def shared_weights(model: nn.Module, layers: list[tuple[str, LoRALayer]]) -> dict[str, list[str]]:
    """LoRA layer name -> other modules whose tensors share memory with its weight (tied)."""
    return shared_memory(model, layers, clean_name)


def refuse_tied(model: nn.Module, layers: list[tuple[str, LoRALayer]], action: str) -> None:
    """Raise if merging would write into a weight that other modules share."""
    tied = shared_weights(model, layers)
    if tied:
        listing = "; ".join(f"{n!r} with {others}" for n, others in list(tied.items())[:5])
        raise StateError(
            f"{action}: the weight of {listing} is shared (tied), so merging would change the "
            "other modules too (one Parameter, or tensors sharing memory). Keep these adapters "
            "unmerged, or untie the weights first (e.g. module.weight = "
            "nn.Parameter(module.weight.clone()))."
        )


def check_mergeable(model: nn.Module, layers: list[tuple[str, LoRALayer]], action: str, *,
                    to_file: bool = False) -> None:
    """Raise unless the active adapters of ``layers`` can be folded into their weights.

    Refused: layer types that cannot merge (``merge_refusal``), weights computed by hooks,
    parametrizations that cannot hold the merged weight, layers sharded by FSDP2,
    weights sharing memory with other modules, disabled adapters. ``to_file``: the
    merged weights go to a file under the ``weight`` keys, which a parametrized layer
    does not have.
    """
    refusing = [(n, why) for n, layer in layers if (why := merge_problem(layer))]
    if to_file:
        refusing += [(n, _PARAMETRIZED_TO_FILE) for n, layer in layers
                     if weight_home(layer) == "parametrized"]
    else:
        refusing += [(n, why) for n, layer in layers if not layer.merged and layer.held_active
                     and weight_home(layer) == "parametrized"
                     and (why := staging_problem(layer, layer.merged_weight()))]
    if refusing:
        raise StateError(
            f"{action}: layers {[n for n, _ in refusing][:5]} cannot be merged: {refusing[0][1]}"
        )
    refuse_sharded(layers, action)
    refuse_tied(model, [(n, layer) for n, layer in layers if not layer.merged], action)
    disabled = [n for n, layer in layers if layer.adapters_disabled]
    if disabled:
        raise StateError(
            f"{action}: adapters are disabled on {disabled[:5]} (inside disable_adapters); "
            "call it outside that block."
        )


_PARAMETRIZED_TO_FILE = (
    "the weight is computed by a parametrization (torch.nn.utils.parametrize), so a file of "
    "the original architecture holds parametrizations.weight.* and no weight key to write. "
    "Call loraplug.merge(model) (or unload(model, merge=True)) and save model.state_dict()."
)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters, in place; several active adapters add up.

    Layers that lack one of the names compute the others. Adapters cannot be switched
    while merged: ``unmerge`` first.

    Args:
        model: a model with LoRA layers.
        names: one adapter name, or a list of them (their sum is computed).

    Raises:
        AdapterError: a name is not an adapter of the model.
        StateError: the model has no LoRA layers, or some are merged.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> _ = lp.inject_lora(model, target="0", rank=2, name="b")
        >>> lp.set_adapter(model, ["default", "b"])
        >>> lp.active_adapters(model)
        ['default', 'b']
    """
    names = _name_list(names, "set_adapter")
    layers = layers_or_raise(model, "set_adapter")
    check_names(model, names, "set_adapter")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise StateError(
            f"set_adapter: layers {merged[:5]} are merged; call loraplug.unmerge(model) before "
            "switching adapters, then merge again."
        )
    for _, layer in layers:
        layer.set_active(names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the ``with`` block; adapters return after it.

    Merged adapters are taken out of the weights on entry and merged again on exit:
    exactly, when they were merged with ``exact=True`` (the default), so the weights
    inside are the base weights and after the block they are bit for bit what they were.

    Raises:
        StateError: the model has no LoRA layers, or merged layers are sharded by FSDP2.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> base = model(torch.ones(1, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> torch.nn.init.ones_(model[0].lora_B["default"])  # doctest: +ELLIPSIS
        Parameter...
        >>> lp.merge(model)
        >>> with lp.disable_adapters(model):
        ...     torch.equal(model(torch.ones(1, 4)), base)
        True
        >>> model[0].merged_adapters
        ('default',)
    """
    layers = layers_or_raise(model, "disable_adapters")
    refuse_sharded([(n, layer) for n, layer in layers if layer.merged], "disable_adapters")
    folds = [[(f.names, f.residual is not None) for f in layer._folds] for _, layer in layers]
    for _, layer in layers:
        take_out(layer, layer.merged_adapters)
    before = [layer.adapters_disabled for _, layer in layers]
    for _, layer in layers:
        layer.set_disabled(True)
    try:
        yield
    finally:
        for (_, layer), flag, merged in zip(layers, before, folds):
            layer.set_disabled(flag)
            for names, exact in merged:
                push(layer, tuple(n for n in names if n in layer.rank), exact=exact)
        # Layers that got their first adapter inside the block leave it with the others.
        inside = {id(layer) for _, layer in layers}
        for _, layer in lora_layers(model):
            if id(layer) not in inside:
                layer.set_disabled(all(before))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer, in place.

    Its tensors leave the model and its ``state_dict``.

    If it was active, the remaining active adapters stay active; when none remain, the
    first remaining adapter (sorted) becomes active, as in PEFT. The LoRA layers stay in
    place (``unload`` removes them).

    Args:
        model: a model with LoRA layers.
        name: the adapter to remove.

    Raises:
        AdapterError: ``name`` is not an adapter of the model.
        StateError: the adapter is merged into some layers; ``unmerge(model, name)`` first.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = lp.inject_lora(model, target=nn.Linear, rank=2)
        >>> _ = lp.inject_lora(model, target="1", rank=2, name="head")
        >>> lp.delete_adapter(model, "default")
        >>> lp.adapter_names(model), lp.active_adapters(model)
        (['head'], ['head'])
    """
    layers = layers_or_raise(model, "delete_adapter")
    check_names(model, [name], "delete_adapter")
    merged = [n for n, layer in layers if name in layer.merged_adapters]
    if merged:
        raise StateError(
            f"delete_adapter: adapter {name!r} is merged into {merged[:5]} (their weights "
            f"hold it); call loraplug.unmerge(model, {name!r}) first."
        )
    # Inside adapter_per_sample each layer routes rows to the adapters in its route's slots.
    routed = [n for n, layer in layers if name in getattr(layer._detour, "slots", ())]
    if routed:
        raise StateError(
            f"delete_adapter: adapter {name!r} is in use inside adapter_per_sample on "
            f"{routed[:5]}; delete it after the with block."
        )
    active = [n for n in active_adapters(model) if n != name]
    for _, layer in layers:
        if name in layer.adapter_names:
            layer.remove_adapter(name)
    remaining = adapter_names(model)
    if not active and remaining:
        active = remaining[:1]
    for _, layer in layers:
        layer.set_active(active, while_merged=True)  # merged adapters are not deleted
