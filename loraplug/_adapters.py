"""Model-level adapter state: which adapters exist, which are active, merged or disabled.

Every function here acts in place on the LoRA layers of a model and checks the whole
model before changing any layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from ._distributed import refuse_sharded
from ._errors import AdapterError, StateError
from ._layer import LoRALayer, refuse_nonfinite
from ._targeting import check_model, clean_name
from ._weights import merge_problem, shared_memory, staging_problem, weight_home


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

    Raises:
        StateError: the model has no LoRA layers, or some are merged (the base weight is
            not available without unmerging; call ``unmerge`` first).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> base = model(torch.ones(1, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> torch.nn.init.ones_(model[0].lora_B["default"])  # doctest: +ELLIPSIS
        Parameter...
        >>> with lp.disable_adapters(model):
        ...     torch.equal(model(torch.ones(1, 4)), base)
        True
    """
    layers = layers_or_raise(model, "disable_adapters")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise StateError(
            f"disable_adapters: layers {merged[:5]} are merged, so their weight holds the "
            "adapters; call loraplug.unmerge(model) first."
        )
    before = [layer.adapters_disabled for _, layer in layers]
    for _, layer in layers:
        layer.set_disabled(True)
    try:
        yield
    finally:
        for (_, layer), flag in zip(layers, before):
            layer.set_disabled(flag)
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
        StateError: some layers are merged; ``unmerge`` first.

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
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise StateError(
            f"delete_adapter: {merged[:5]} are merged (their weights hold the active "
            "adapters); call loraplug.unmerge(model) first."
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
        layer.set_active(active)


def merge(model: nn.Module, *, safe: bool = False) -> None:
    """Fold the active adapters into the base weights, in place.

    ``W ← W + Σ_a s_a ΔW_a``, with ΔW summed in float32 for float16/bfloat16 weights and
    cast once. While merged, each LoRA layer's forward is exactly the base computation.
    Merging an already merged model is a no-op, so ΔW is never added twice.

    Args:
        model: a model with LoRA layers.
        safe: compute every merged weight first and check that all are finite before
            writing any: either every layer merges or none does. Holds one extra copy of
            the adapted weights while checking.

    Raises:
        StateError: the model has no LoRA layers, a layer type cannot merge
            (``merge_refusal``), adapters are disabled, ``safe`` is set and a merged
            weight is not finite, a LoRA layer's weight is tied to another module's (or
            shares its memory), is computed by a hook, or is parametrized by something
            that cannot hold the merged weight, or FSDP2 has sharded the LoRA layers
            (nothing is changed then).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> _ = torch.nn.init.normal_(model[0].lora_B["default"])
        >>> x = torch.randn(3, 4)
        >>> before = model(x)
        >>> lp.merge(model)
        >>> with torch.no_grad():  # inference: merged adapters cannot train
        ...     torch.allclose(model(x), before, atol=1e-6)
        True
    """
    layers = layers_or_raise(model, "merge")
    check_mergeable(model, layers, "merge")
    if not safe:
        for _, layer in layers:
            layer.merge()
        return
    staged = []
    for name, layer in layers:
        new = layer.stage_merge()
        if new is not None:
            refuse_nonfinite(new, f"merge(safe=True): merging {list(layer.held_active)} into "
                             f"{name!r} gives NaN or inf weights; no layer was changed. Check "
                             "that adapter's tensors.")
            staged.append((layer, new))
    for layer, new in staged:
        layer.commit_merge(new)


def unmerge(model: nn.Module) -> None:
    """Take merged adapters out of the base weights again, in place; a no-op if none are.

    ``W ← W − Σ_a s_a ΔW_a`` in the same precision as ``merge``. The round trip is not
    bit for bit: each element comes back within one ulp of the larger of ``|W|`` and
    ``|W + ΔW|``, which for a weight near zero is many of its own ulps (see
    docs/concepts.md). ``unload(merge=False)`` on a never-merged model returns
    bit-identical weights.

    Args:
        model: a model with LoRA layers.

    Raises:
        StateError: the model has no LoRA layers, or FSDP2 has sharded them.
    """
    layers = layers_or_raise(model, "unmerge")
    refuse_sharded(layers, "unmerge")
    for _, layer in layers:
        layer.unmerge()
