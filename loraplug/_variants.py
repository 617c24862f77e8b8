"""Adapters that are more than ``s · B A``: DoRA's magnitude and a bias on B.

A LoRA layer's adapters are plain by default; two per-adapter options extend one:

- **DoRA** (``dora=True``): a trained magnitude per output channel, ``lora_magnitude_vector``
  (see ``_dora``);
- **B's bias** (``lora_bias=True``, PEFT's name): the branch is ``s · (B A x + b_B)``, a
  trained bias per output channel in ``lora_B_bias`` that merges into the base bias.

Their registries are made on first use, so a layer of plain adapters is unchanged (its
forward checks one empty set). Layers compute such adapters here: one forward loop and
one fold for every layer type, from the type's tensor hooks and the shape in which a
per-channel vector broadcasts over its output (:meth:`LoRALayer.channel_shape`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from . import _dora

if TYPE_CHECKING:
    from ._layer import LoRALayer

Scale = float | Tensor

#: The registries of a LoRA layer that hold adapter tensors (``state_dict`` key parts).
ADAPTER_REGISTRIES = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dora_norm",
                      "lora_B_bias")


def registry(layer: nn.Module, key: str) -> dict[str, Tensor]:
    """The tensors of registry ``key`` (``lora_magnitude_vector``, ...), or an empty dict."""
    module = layer._modules.get(key)
    if module is None:
        return {}
    store = module._buffers if key == "lora_dora_norm" else module._parameters
    return cast(dict[str, Tensor], store)


def _ensure(layer: LoRALayer, key: str) -> nn.Module:
    if key not in layer._modules:
        layer.add_module(key, _dora.BufferDict() if key == "lora_dora_norm" else nn.ParameterDict())
    return cast(nn.Module, layer._modules[key])


def _refresh(layer: LoRALayer) -> None:
    layer.__dict__["_extended"] = frozenset(registry(layer, "lora_magnitude_vector")) | \
        frozenset(registry(layer, "lora_B_bias"))


def add_magnitude(layer: LoRALayer, name: str, magnitude: Tensor) -> None:
    """Make adapter ``name`` a DoRA adapter with ``magnitude`` (shaped ``channel_shape``)."""
    cast(nn.ParameterDict, _ensure(layer, "lora_magnitude_vector"))[name] = nn.Parameter(magnitude)
    norm = torch.zeros(magnitude.numel(), dtype=magnitude.dtype, device=magnitude.device)
    cast(_dora.BufferDict, _ensure(layer, "lora_dora_norm"))[name] = norm
    _refresh(layer)


def add_bias(layer: LoRALayer, name: str, bias: Tensor) -> None:
    """Give adapter ``name`` a bias on B, ``bias`` of shape (channels,)."""
    cast(nn.ParameterDict, _ensure(layer, "lora_B_bias"))[name] = nn.Parameter(bias)
    _refresh(layer)


def remove(layer: LoRALayer, name: str) -> None:
    """Drop adapter ``name``'s magnitude, norm and bias, where it has them."""
    for key in ("lora_magnitude_vector", "lora_dora_norm", "lora_B_bias"):
        module = layer._modules.get(key)
        if module is not None and name in registry(layer, key):
            del registry(layer, key)[name]
            if not registry(layer, key):
                del layer._modules[key]
    _refresh(layer)


def adapter_tensors(layer: LoRALayer, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s trained tensors beyond A and B: ``magnitude``, ``bias``."""
    found = {}
    for key, label in (("lora_magnitude_vector", "magnitude"), ("lora_B_bias", "bias")):
        if name in registry(layer, key):
            found[label] = registry(layer, key)[name]
    return found


def _channels(layer: LoRALayer, vector: Tensor, like: Tensor) -> Tensor:
    return vector.view(cast(tuple[int, ...], layer.channel_shape(vector.numel()))).to(like.dtype)


def forward(layer: LoRALayer, x: Tensor, names: tuple[str, ...],
            scales: Mapping[str, Scale]) -> Tensor:
    """The output with live adapters ``names``, some of them DoRA or with B's bias."""
    mags = registry(layer, "lora_magnitude_vector")
    if any(n in mags for n in names):
        return _dora.forward(layer, x, names, scales, registry(layer, "lora_B_bias"))
    biases = registry(layer, "lora_B_bias")
    out = layer.base_forward(x)
    for name in names:
        a, b = layer._adapter(name)
        h = layer.lora_dropout[name](x) if layer.training and layer.dropout[name] else x
        out = layer.add_lora(out, h, a, b, scales[name])
        if name in biases:
            out = out + scales[name] * _channels(layer, biases[name], out)
    return out


def fold(layer: LoRALayer, target: Tensor, names: tuple[str, ...],
         scales: Mapping[str, Scale], sign: int) -> None:
    """``target`` (the weight, compute dtype) with ``names`` merged (sign 1) or taken out."""
    _dora.fold(layer, target, names, scales, sign)


def bias_refusal(layer: LoRALayer, names: tuple[str, ...]) -> str | None:
    """Why B's bias of ``names`` cannot be merged on this layer, or ``None``."""
    biased = [n for n in names if n in registry(layer, "lora_B_bias")]
    if biased and layer._parameters.get("bias") is None:
        return (f"adapters {biased} have a bias on B (lora_bias), which merges into the base "
                "layer's bias, and this layer has none; keep them unmerged, as PEFT does.")
    return None


@torch.no_grad()
def fold_bias(layer: LoRALayer, names: tuple[str, ...], sign: int) -> None:
    """The base bias += sign · s · b_B over ``names`` that have B's bias."""
    biases = registry(layer, "lora_B_bias")
    base = layer._parameters.get("bias")
    for name in names:
        if name in biases and base is not None:  # merge refuses biases without a base bias
            base.add_(biases[name].to(base.dtype), alpha=sign * float(layer.scaling[name]))


def adapted_bias(layer: LoRALayer, names: tuple[str, ...],
                 scales: Mapping[str, Scale]) -> Tensor | None:
    """The base bias plus ``s · b_B`` of ``names`` (for a forward through the weight)."""
    base = layer._parameters.get("bias")
    biases = registry(layer, "lora_B_bias")
    extra = [scales[n] * biases[n] for n in names if n in biases]
    if not extra:
        return base
    dtype = layer._tensor("weight").dtype if base is None else base.dtype
    total = torch.stack([e.to(dtype) for e in extra]).sum(0)
    return total if base is None else base + total


def routed(layer: LoRALayer, out: Tensor, xs: Tensor, branch: Tensor,
           chosen: Tensor | None, slot: Tensor | None, slots: tuple[str, ...],
           dropped: bool) -> Tensor:
    """``adapter_per_sample``'s output when some of ``slots`` are DoRA or have B's bias.

    Row i with adapter j adds (f_j − 1) ⊙ W x_i + f_j ⊙ branch_i + s_j·b_j: f_j = 1 for a
    plain adapter, b_j = 0 without B's bias. ``out`` is the base output of every row,
    ``xs`` the chosen rows' branch input (after dropout when ``dropped``).
    """
    mags, biases = registry(layer, "lora_magnitude_vector"), registry(layer, "lora_B_bias")
    channels = _dora.matrix_shape(layer)[0]
    ones = out.new_ones(channels)
    factors = torch.stack([
        _dora.factor(layer, n, layer.scaling[n]).reshape(-1).to(out.dtype) if n in mags
        else ones for n in slots])
    shifts = torch.stack([
        layer.scaling[n] * biases[n].to(out.dtype) if n in biases else 0 * ones
        for n in slots])
    if slot is not None:
        factors, shifts = factors[slot], shifts[slot]
    # A per-row channel vector, broadcast like the output (channels last, or at dim 1).
    shape = cast(tuple[int, ...], layer.channel_shape(channels))
    axis = out.dim() - 1 if len(shape) == 1 else 1
    view = [factors.shape[0]] + [1] * (out.dim() - 1)
    view[axis] = channels
    factors, shifts = factors.view(view), shifts.view(view)
    base_bias = layer._parameters.get("bias")
    rows = out if chosen is None else out.index_select(0, chosen)
    plain = layer.base_forward(xs) if dropped else rows
    if base_bias is not None:
        plain = plain - base_bias.view(shape).to(plain.dtype)
    step = (factors - 1) * plain + factors * branch + shifts
    return out + step if chosen is None else out.index_add(0, chosen, step)
