"""Parts: pieces of one module that take adapters of their own, named ``<module>.<part>``.

``nn.MultiheadAttention`` computes q, k, v and its output projection from parameters it
reads itself, so its LoRA layer adapts them as parts: nested LoRA layers, targeted as
``<path>.q``, ``<path>.k``, ``<path>.v`` and ``<path>.out_proj`` whether or not a module
of that name exists yet. A layer type has parts when it defines

- ``parts_of(module) -> {part: module}``: what each part's LoRA layer wraps;
- ``implied_parts(module)``: the parts adapted when the module itself is targeted;
- ``takes_adapter(module)``: whether the module itself then takes an adapter too;
- ``attach_part(part, layer)``: put a part's new LoRA layer in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ._layer import LoRALayer
from ._registry import lookup


@dataclass(frozen=True)
class Part:
    """Where a part candidate belongs."""

    #: clean name and real path of the module that owns the part, and the module itself
    #: (the original module, or the LoRA layer that wraps it)
    owner: str
    owner_path: str
    owner_module: nn.Module
    #: the part's name, last in its own name (``<owner>.<part>``)
    part: str


def layer_class(module: nn.Module) -> type | None:
    """The LoRA layer class that wraps (or is) ``module``, or None."""
    if isinstance(module, LoRALayer):
        return type(module)
    found = lookup(type(module))
    return None if found is None else found[0]


def layer_parts(module: nn.Module) -> dict[str, nn.Module]:
    """Part name -> the module its LoRA layer wraps, for modules whose layer type has parts."""
    parts_of = getattr(layer_class(module), "parts_of", None)
    return {} if parts_of is None else parts_of(module)


def walk(model: nn.Module, clean: object) -> Iterator[tuple[str, str, nn.Module, Part | None]]:
    """(clean name, path, module, part or None) for every candidate, parts included.

    Inside a LoRA layer or a module with parts, only the parts are candidates.
    ``clean`` maps a path to its clean name.
    """
    closed: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path.startswith(prefix) for prefix in closed):
            continue
        parts = layer_parts(module)
        if isinstance(module, LoRALayer) or parts:
            if path == "" and isinstance(module, LoRALayer):
                continue
            closed.append(path + "." if path else "")
        name = clean(path)  # type: ignore[operator]
        yield name, path, module, None
        prefix = f"{path}." if path else ""
        for part, inner in parts.items():
            yield clean(prefix + part), prefix + part, inner, Part(name, path, module, part)  # type: ignore[operator]


def with_implied_parts(picked: list[tuple[str, str, nn.Module]],
                       walked: list[tuple[str, str, nn.Module, Part | None]],
                       excluded: set[str]) -> list[tuple[str, str, nn.Module]]:
    """``picked`` with each module that has parts replaced by what targeting it means.

    That is its own adapter (when its layer type gives it one) and the parts the type
    implies (attention: in_proj and out_proj, as PEFT adapts it), minus ``excluded``.
    """
    parts = {name: (name, path, module) for name, path, module, part in walked if part}
    found: dict[str, tuple[str, str, nn.Module]] = {}
    for name, path, module in picked:
        cls = layer_class(module)
        implied = getattr(cls, "implied_parts", None)
        if implied is None or name in parts:
            found.setdefault(name, (name, path, module))
            continue
        if cls.takes_adapter(module):  # type: ignore[union-attr]
            found.setdefault(name, (name, path, module))
        for part in implied(module):
            full = f"{name}.{part}" if name else part
            if full not in excluded:
                found.setdefault(full, parts[full])
    return list(found.values())
