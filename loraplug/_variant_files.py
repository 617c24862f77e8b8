"""Checks of one layer's tensors in a file: A and B's shapes, DoRA's magnitude, B's bias.

PEFT writes them beside A and B: ``<path>.lora_magnitude_vector`` (Linear (out,), Conv
(1, out, 1…), Embedding (d,): the layer's :meth:`channel_shape`) and ``<path>.lora_B.bias``
(out,). The config says whether they must be there: ``use_dora``, ``lora_bias``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _variants
from ._layer import LoRALayer
from ._matrix import matrix_shape

#: Slot -> (the config field that asks for it, its key suffix, what it is).
_SLOTS = {"M": ("use_dora", "lora_magnitude_vector", "a DoRA magnitude"),
          "bias": ("lora_bias", "lora_B.bias", "B's bias (PEFT's lora_bias)")}


def variant_problems(path: str, probe: LoRALayer, extra: dict[str, Tensor], *, dora: bool,
                     lora_bias: bool, source: str = "in the config") -> list[str]:
    """What is wrong with a layer's magnitude and bias, given what ``source`` asks for."""
    wanted = {"M": dora, "bias": lora_bias}
    channels, _ = matrix_shape(probe)
    problems = []
    for slot, (field, suffix, what) in _SLOTS.items():
        if wanted[slot] and slot not in extra:
            problems.append(f"{path}: {field} is true {source}, but the file lacks "
                            f"{path}.{suffix}.")
        elif not wanted[slot] and slot in extra:
            problems.append(f"{path}: the file holds {what} ({path}.{suffix}), but {field} is "
                            f"false {source}; set {field}: true if the adapter was trained "
                            "with it.")
        elif slot in extra and extra[slot].numel() != channels:
            problems.append(f"{path}: {path}.{suffix} has shape {tuple(extra[slot].shape)}; "
                            f"this layer has {channels} output channels.")
    return problems


def adapter_variant_problems(path: str, layer: LoRALayer, adapter: str,
                             extra: dict[str, Tensor]) -> list[str]:
    """:func:`variant_problems` for tensors meant for adapter ``adapter`` on ``layer``."""
    return variant_problems(
        path, layer, extra, dora=adapter in _variants.registry(layer, "lora_magnitude_vector"),
        lora_bias=adapter in _variants.registry(layer, "lora_B_bias"), source="for this adapter")


@torch.no_grad()
def fill_variants(layer: LoRALayer, adapter: str, extra: dict[str, Tensor]) -> None:
    """Copy a layer's magnitude and bias from ``extra`` into adapter ``adapter``."""
    for slot, key in (("M", "lora_magnitude_vector"), ("bias", "lora_B_bias")):
        if slot in extra:
            target = _variants.registry(layer, key)[adapter]
            target.copy_(extra[slot].reshape(target.shape))


def variant_state(layer: LoRALayer, path: str, adapter: str) -> dict[str, Tensor]:
    """The magnitude and bias of ``adapter`` on ``layer`` under PEFT's keys."""
    found = _variants.adapter_tensors(layer, adapter)
    state = {}
    if "magnitude" in found:
        state[f"{path}.lora_magnitude_vector"] = found["magnitude"].detach()
    if "bias" in found:
        state[f"{path}.lora_B.bias"] = found["bias"].detach()
    return state
