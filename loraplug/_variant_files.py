"""Checks of one layer's tensors in a file: A and B's shapes, DoRA's magnitude, B's bias.

PEFT writes them beside A and B: ``<path>.lora_magnitude_vector`` (Linear (out,), Conv
(1, out, 1…), Embedding (d,): the layer's :meth:`channel_shape`) and ``<path>.lora_B.bias``
(out,). The config says whether they must be there: ``use_dora``, ``lora_bias``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _variants
from ._format import CONFIG_NAME
from ._layer import LoRALayer
from ._matrix import matrix_shape

#: Slot -> (the config field that asks for it, its key suffix, what it is).
_SLOTS = {"M": ("use_dora", "lora_magnitude_vector", "a DoRA magnitude"),
          "bias": ("lora_bias", "lora_B.bias", "B's bias (PEFT's lora_bias)")}


def variant_problems(path: str, probe: LoRALayer, extra: dict[str, Tensor], *, dora: bool,
                     lora_bias: bool, source: str = "in the config") -> list[str]:
    """What is wrong with a layer's magnitude and bias, given what ``source`` asks for."""
    wanted = {"M": dora, "bias": lora_bias}
    g, m, _ = matrix_shape(probe)
    problems = []
    for slot, (field, suffix, what) in _SLOTS.items():
        if wanted[slot] and slot not in extra:
            problems.append(f"{path}: {field} is true {source}, but the file lacks "
                            f"{path}.{suffix}.")
        elif not wanted[slot] and slot in extra:
            problems.append(f"{path}: the file holds {what} ({path}.{suffix}), but {field} is "
                            f"false {source}; set {field}: true if the adapter was trained "
                            "with it.")
        elif slot in extra and extra[slot].numel() != g * m:
            problems.append(f"{path}: {path}.{suffix} has shape {tuple(extra[slot].shape)}; "
                            f"this layer has {g * m} output channels.")
    return problems


def layer_file_problems(path: str, probe: LoRALayer, tensors: tuple[Tensor, Tensor],
                        extra: dict[str, Tensor], rank: int, source: str, *, dora: bool,
                        lora_bias: bool) -> list[str]:
    """What is wrong with one layer's tensors in a file: A and B's shapes, the magnitude
    and B's bias against the config's ``use_dora`` and ``lora_bias``."""
    shape = expected_shape_problem(path, probe, tensors, rank, source)
    return ([shape] if shape else []) + variant_problems(path, probe, extra, dora=dora,
                                                         lora_bias=lora_bias)


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


def expected_shape_problem(path: str, probe: LoRALayer, got: tuple[Tensor, Tensor],
                            rank: int, source: str) -> str | None:
    """Why A and B from a file do not fit ``probe`` at ``rank``, or ``None``."""
    want_a, want_b = probe.adapter_shapes(rank)
    a, b = tuple(got[0].shape), tuple(got[1].shape)
    if (a, b) == (tuple(want_a), tuple(want_b)):
        return None
    groups = getattr(probe, "groups", 1)
    if groups > 1 and len(a) == len(want_a) and a[1] == want_a[1] * groups and a[2:] == want_a[2:]:
        return (
            f"{path}: lora_A has shape {a}, PEFT's layout for a grouped convolution "
            f"(groups={groups}), where A reads all {a[1]} input channels; loraplug's A is "
            f"grouped too, shape {tuple(want_a)} (r, in/groups, k…), so that ΔW is block "
            "diagonal like the weight and merges exactly. PEFT's A mixes channels across "
            "groups, which no grouped convolution weight can express, so this adapter cannot "
            "be loaded. Exclude grouped convolutions when training with PEFT, or train this "
            "layer with loraplug."
        )
    message = (f"{path}: A {a} and B {b} in the file, but rank {rank} (from {source}) needs "
               f"A {tuple(want_a)} and B {tuple(want_b)}")
    if a and probe.adapter_shapes(a[0]) == (a, b):
        return message + (f"; the tensors have rank {a[0]}, so {source} in {CONFIG_NAME} "
                          "disagrees with the weights.")
    return message + "; the file was saved for a layer of another shape."
