"""Merging adapters into the base weights by name, in any order, undone bit for bit.

The model-level ``merge`` and ``unmerge``; each layer's stack of folds is ``_folds``'s.
A model-wide merge that fails on one layer (a sum with NaN or inf) takes its folds off
the layers before it, so the model is left bit for bit as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._adapters import check_mergeable, check_names, layers_or_raise
from ._distributed import refuse_sharded
from ._errors import AdapterError, ConfigError, StateError
from ._folds import names_to_merge, pop, push, take_out
from ._layer import LoRALayer
from ._quantized import is_quantized, refuse_quantized


def _names(names: object, action: str) -> list[str] | None:
    if names is None:
        return None
    listed = [names] if isinstance(names, str) else names
    if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
        raise AdapterError(
            f"{action}: expected an adapter name, a list of names or None; received {names!r}."
        )
    return list(dict.fromkeys(listed))


def merge(model: nn.Module, names: str | Sequence[str] | None = None, *, safe: bool = False,
          exact: bool = True, requantize: bool = False) -> dict[str, float] | None:
    """Fold adapters into the base weights, in place: the active ones, or ``names``.

    ``W ← W + Σ_a s_a ΔW_a`` over the adapters not merged yet (ΔW summed in float32 for
    float16/bfloat16 weights, then rounded once). Merging them again is a no-op. Merged
    adapters act whether active or not, and the active ones that are not merged are
    still computed beside the weight, so the model computes the same function merged or
    not. With ``exact`` (the default) each layer keeps what rounding destroyed, a few
    percent of the weight's bytes for typical adapters (docs/benchmarks.md), so that
    :func:`unmerge` gives ``W`` back bit for bit, in any order and after any number of
    cycles.

    Every merge is checked: if a merged weight would have NaN or inf entries (from the
    adapters, or an overflow of float16), nothing is written, or what was written is
    taken out again exactly; the model is then left bit for bit as it was.

    Args:
        model: a model with LoRA layers.
        names: an adapter name or a list of them; ``None`` merges the active adapters.
        safe: kept for compatibility; every merge is checked now.
        exact: keep what :func:`unmerge` needs to give ``W`` back bit for bit; without
            it, unmerging subtracts ΔW (``W`` up to the rounding of ``W + ΔW``).
        requantize: allow merging into weights stored quantized (bitsandbytes, torchao):
            ``W ← quantize(dequantize(W) + Σ s·ΔW)``, which rounds the sum back to the
            quantized grid and so changes the base by more than the adapter. ``unmerge``
            puts the stored weights back bit for bit. For full-precision merged weights
            use :func:`save_merged`.

    Returns:
        With ``requantize``: layer name → ``max |W_new − (W + ΔW)|`` for each quantized
        layer merged now (the error requantizing introduced). Otherwise ``None``.

    Raises:
        AdapterError: a name is not an adapter of the model.
        StateError: the model has no LoRA layers; a layer type cannot merge
            (``merge_refusal``); adapters are disabled; a merged weight would not be
            finite; a LoRA layer's weight is tied to another module's; or FSDP2 has
            sharded the LoRA layers; a layer's weight is quantized and ``requantize`` is
            not set, or its format cannot be requantized. Nothing is changed then.
        ConfigError: ``requantize`` is not a bool.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> _ = torch.nn.init.normal_(model[0].lora_B["default"])
        >>> x, original = torch.randn(3, 4), model[0].weight.clone()
        >>> before = model(x)
        >>> lp.merge(model)
        >>> with torch.no_grad():  # inference: merged adapters cannot train
        ...     torch.allclose(model(x), before, atol=1e-6)
        True
        >>> lp.unmerge(model)
        >>> torch.equal(model[0].weight, original)
        True
    """
    listed = _names(names, "merge")
    layers = layers_or_raise(model, "merge")
    if listed is not None:
        check_names(model, listed, "merge")
    todo = [(path, layer, names_to_merge(layer, listed)) for path, layer in layers]
    todo = [entry for entry in todo if entry[2]]
    check_mergeable(model, [(path, layer) for path, layer, _ in todo], "merge")
    if not isinstance(requantize, bool):
        raise ConfigError(f"merge: requantize must be True or False; received {requantize!r}.")
    refuse_quantized([(path, layer) for path, layer, _ in todo], "merge", requantize=requantize)
    quantized = {path: layer for path, layer, _ in todo if is_quantized(layer)}
    todo = [entry for entry in todo if entry[0] not in quantized]
    for layer in quantized.values():  # checked above: requantizing is what was asked
        layer.merge(requantize=True)  # type: ignore[call-arg]
    done: list[LoRALayer] = []
    try:
        for path, layer, adding in todo:
            try:
                push(layer, adding)
            except StateError as err:
                raise StateError(f"merge: {path!r}: {err} No layer was changed.") from None
            done.append(layer)
    except StateError:
        for layer in reversed(done):
            pop(layer)
        raise
    if not exact:
        for layer in done:
            layer._folds[-1].residual = None
    if not requantize:
        return None
    return {path: float(getattr(layer, "requantization_error", 0.0)) for path, layer
            in quantized.items()}


def unmerge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Take merged adapters out of the base weights, in place: all, or ``names``.

    Adapters merged with ``exact=True`` (the default) come out bit for bit: the weight
    is then exactly what it would be had they never been merged, in float32, bfloat16
    and float16, whatever the order of merges and unmerges. Adapters merged after the
    ones taken out are taken out and merged again on the way. A weight written while
    merged is unmerged by subtracting ΔW, with a ``LoRAWarning``.

    Args:
        model: a model with LoRA layers.
        names: an adapter name or a list of them; ``None`` unmerges every merged one.
            Names not merged are ignored.

    Raises:
        AdapterError: a name is not an adapter of the model.
        StateError: the model has no LoRA layers, FSDP2 has sharded them, or what would
            stay merged on a layer is not finite on its own (that layer is unchanged).
    """
    listed = _names(names, "unmerge")
    layers = layers_or_raise(model, "unmerge")
    if listed is not None:
        check_names(model, listed, "unmerge")
    refuse_sharded(layers, "unmerge")
    for path, layer in layers:
        if is_quantized(layer):  # a requantized weight holds its adapters all at once
            if listed is None or set(listed) & set(layer.merged_adapters):
                layer.unmerge()
            continue
        try:
            take_out(layer, layer.merged_adapters if listed is None else listed)
        except StateError as err:
            raise StateError(f"unmerge: {path!r}: {err}") from None
