"""What ``save_adapter`` writes beyond A and B: PEFT's per-adapter config fields, and the
conversion of an adapter that rewrote its base into a plain one against the original.
"""

from __future__ import annotations

import math

from torch import Tensor

from . import _variants
from ._errors import AdapterFileError
from ._format import key_names
from ._inits import plain_tensors
from ._layer import LoRALayer

#: loraplug's init -> PEFT's ``init_lora_weights`` (the others are spelled alike).
_PEFT_INIT: dict[str, object] = {"kaiming": True}


def uniform_fields(layers: list[tuple[str, LoRALayer]], name: str) -> dict[str, object]:
    """``use_rslora``, ``use_dora``, ``lora_bias`` and ``init_lora_weights`` of adapter
    ``name``: one value per adapter in PEFT's config, so every layer must agree.

    Raises:
        AdapterFileError: the layers disagree on one of them.
    """
    getters = {
        "use_rslora": lambda layer: layer.use_rslora[name],
        "use_dora": lambda layer: name in _variants.registry(layer, "lora_magnitude_vector"),
        "lora_bias": lambda layer: name in _variants.registry(layer, "lora_B_bias"),
        "init_lora_weights": lambda layer: _PEFT_INIT.get(layer.init.get(name, "kaiming"),
                                                          layer.init.get(name, "kaiming")),
    }
    fields = {}
    for field, get in getters.items():
        values = {path: get(layer) for path, layer in layers}
        if len(set(map(str, values.values()))) > 1:
            groups = {str(v): sorted(p for p, w in values.items() if w == v)[:3]
                      for v in values.values()}
            raise AdapterFileError(
                f"save_adapter: adapter {name!r} has {field} {groups} on different layers; "
                f"PEFT's config has one {field} per adapter. Save the groups as separate "
                "adapters.")
        fields[field] = next(iter(values.values()))
    return fields


def as_plain(layers: list[tuple[str, LoRALayer]], name: str,
             specs: dict[str, tuple[int, float, float]],
             state: dict[str, Tensor]) -> tuple[dict[str, tuple[int, float, float]],
                                               dict[str, Tensor]]:
    """Specs and tensors of adapter ``name`` as a plain adapter against the original W.

    ``s·B A − s·B₀A₀ = s·[B, −B₀][A; A₀]``: rank 2r, and alpha doubled (× √2 with rsLoRA)
    so that the scaling stays s. A DoRA magnitude carries over unchanged: the adapted
    weight W + s·ΔW is the same.

    Raises:
        AdapterFileError: a layer has no starting values (A₀, B₀) for the adapter.
    """
    missing = [p for p, layer in layers if name not in layer.initial_values]
    if missing:
        raise AdapterFileError(
            f"save_adapter(plain=True): {missing[:5]} have no starting values of adapter "
            f"{name!r} (they are kept from inject_lora or load_adapter on, in this process "
            "and in a pickled model); save it without plain=True instead.")
    specs, state = dict(specs), dict(state)
    for path, layer in layers:
        a0, b0 = layer.initial_values[name]
        a, b = plain_tensors(layer.lora_A[name].detach(), layer.lora_B[name].detach(), a0, b0)
        key_a, key_b = key_names(type(layer))
        state[f"{path}.{key_a}"], state[f"{path}.{key_b}"] = a, b
        rank, alpha, dropout = specs[path]
        factor = math.sqrt(2) if layer.use_rslora[name] else 2
        specs[path] = (2 * rank, alpha * factor, dropout)
    return specs, state

