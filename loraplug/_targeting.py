"""Which modules a target specification names.

A target is one of, or a list of:

- a glob over the full dotted module name (``"classifier.*"``, ``"*.q_proj"``,
  ``"features.0"``); ``*`` and ``?`` may cross dots, matching is case-sensitive;
- a compiled regex, matched with ``fullmatch`` against the full name;
- a module type (``nn.Linear``), matched with ``isinstance`` (a LoRA layer matches the
  type of the module it wraps);
- a predicate ``(name, module) -> bool``.

Names are those of ``model.named_modules()`` with any ``_orig_mod.`` segment (added by
``torch.compile``) removed, so a compiled model is targeted like the original. Modules
inside a LoRA layer (its adapters, dropouts) are never candidates.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

from torch import nn

from ._errors import TargetError
from ._layer import LoRALayer
from ._registry import lookup, supported_types, type_name

Pattern = Union[str, "re.Pattern[str]", type, Callable[[str, nn.Module], bool]]
TargetSpec = Union[Pattern, Sequence[Pattern]]

_COMPILE_PREFIX = "_orig_mod."


def clean_name(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` inserts."""
    return name.replace(_COMPILE_PREFIX, "") if _COMPILE_PREFIX in name else name


@dataclass(frozen=True)
class Part:
    """A part of a module adapted through a LoRA layer of its own (q, k, v of attention)."""

    #: clean name and real path of the module that owns the part, and the module itself
    #: (the original module, or the LoRA layer that wraps it)
    owner: str
    owner_path: str
    owner_module: nn.Module
    #: the part's name, last in its own name (``<owner>.<part>``)
    part: str


def layer_parts(module: nn.Module) -> dict[str, nn.Module]:
    """Part name -> the module its LoRA layer wraps, for modules whose layer type has parts."""
    parts_of = getattr(_layer_class(module), "parts_of", None)
    return {} if parts_of is None else parts_of(module)


def _walk(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, Part | None]]:
    # Inside a LoRA layer or a module with parts, only the parts are candidates.
    closed: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path.startswith(prefix) for prefix in closed):
            continue
        parts = layer_parts(module)
        if isinstance(module, LoRALayer) or parts:
            if path == "" and isinstance(module, LoRALayer):
                continue
            closed.append(path + "." if path else "")
        name = clean_name(path)
        yield name, path, module, None
        for part, inner in parts.items():
            prefix = f"{path}." if path else ""
            yield (clean_name(prefix + part), prefix + part, inner,
                   Part(name, path, module, part))


def candidates(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(clean name, real path, module) for every module at every path it is reachable at.

    A module shared by several parents appears once per path; LoRA internals are skipped.
    Parts of a module (q, k, v and out_proj of an attention) appear under
    ``<module>.<part>``, whether or not a module of that name exists yet.
    """
    for name, path, module, _ in _walk(model):
        yield name, path, module


def parts_index(model: nn.Module) -> dict[str, Part]:
    """Clean name of every part candidate -> where it belongs."""
    return {name: part for name, _, _, part in _walk(model) if part is not None}


def _as_list(spec: TargetSpec | None) -> list[Pattern]:
    if spec is None:
        return []
    if isinstance(spec, (str, re.Pattern, type)) or callable(spec):
        return [spec]
    if isinstance(spec, Sequence):
        return list(spec)
    raise TargetError(
        f"target received {spec!r} ({type(spec).__name__}); expected a glob string, a compiled "
        "regex, a module type, a predicate (name, module) -> bool, or a list of these."
    )


def _matcher(pattern: Pattern) -> Callable[[str, nn.Module], bool]:
    if isinstance(pattern, str):
        return lambda name, module: fnmatch.fnmatchcase(name, pattern)
    if isinstance(pattern, re.Pattern):
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(pattern, type):
        if not issubclass(pattern, nn.Module):
            raise TargetError(
                f"target type {pattern!r} is not an nn.Module subclass; pass a module class "
                "such as nn.Linear."
            )
        # A LoRA layer stands for the module it wraps (to add a second adapter by type).
        return lambda name, module: isinstance(
            module.base_layer if isinstance(module, LoRALayer) else module, pattern
        )
    if callable(pattern):
        return lambda name, module: bool(pattern(name, module))
    raise TargetError(
        f"target pattern {pattern!r} ({type(pattern).__name__}) is not a glob string, regex, "
        "module type or predicate."
    )


def describe(pattern: Pattern) -> str:
    """A pattern as a user wrote it, for messages."""
    if isinstance(pattern, re.Pattern):
        return f"re.compile({pattern.pattern!r})"
    if isinstance(pattern, type):
        return type_name(pattern)
    if isinstance(pattern, str):
        return repr(pattern)
    return getattr(pattern, "__name__", repr(pattern))


def _suggest(pattern: Pattern, names: list[str]) -> str:
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    if not isinstance(text, str):
        return ""
    leaves = sorted({"*." + n.rsplit(".", 1)[-1] for n in names if "." in n})
    close = difflib.get_close_matches(text, names + leaves, n=5, cutoff=0.6)
    if not close:
        return " No module name is close to it."
    return f" Close module names: {close}."


def _with_implied_parts(picked: list[tuple[str, str, nn.Module]],
                        walked: list[tuple[str, str, nn.Module, Part | None]],
                        excluded: set[str]) -> list[tuple[str, str, nn.Module]]:
    # A module with parts, targeted as a whole, stands for its own adapter (when its layer
    # type gives it one) and the parts that type implies (attention: in_proj and out_proj,
    # as PEFT adapts it), minus the excluded ones.
    parts = {name: (name, path, module) for name, path, module, part in walked if part}
    found: dict[str, tuple[str, str, nn.Module]] = {}
    for name, path, module in picked:
        layer_cls = _layer_class(module)
        implied = getattr(layer_cls, "implied_parts", None)
        if implied is None or name in parts:
            found.setdefault(name, (name, path, module))
            continue
        if layer_cls.takes_adapter(module):  # type: ignore[union-attr]
            found.setdefault(name, (name, path, module))
        for part in implied(module):
            full = f"{name}.{part}" if name else part
            if full not in excluded:
                found.setdefault(full, parts[full])
    return list(found.values())


def _layer_class(module: nn.Module) -> type | None:
    if isinstance(module, LoRALayer):
        return type(module)
    found = lookup(type(module))
    return None if found is None else found[0]


@dataclass
class Selection:
    """What a target specification selects in a model."""

    #: clean name -> module, for every supported module selected (sorted by name).
    modules: dict[str, nn.Module] = field(default_factory=dict)
    #: clean name -> real path (differs on compiled models).
    paths: dict[str, str] = field(default_factory=dict)
    #: clean name -> type name, for selected modules no LoRA layer is registered for.
    unsupported: dict[str, str] = field(default_factory=dict)


def select(model: nn.Module, target: TargetSpec, exclude: TargetSpec | None = None) -> Selection:
    """Resolve ``target`` minus ``exclude`` against ``model``; changes nothing.

    Raises:
        TargetError: a pattern matches no module (with close names), the spec is
            malformed, or nothing selected has a registered LoRA layer.
    """
    includes = _as_list(target)
    if not includes:
        raise TargetError(
            "target is empty; name the layers to adapt, e.g. target=['classifier.*'] or "
            "target=nn.Linear."
        )
    excludes = _as_list(exclude)
    inc = [(p, _matcher(p)) for p in includes]
    exc = [(p, _matcher(p)) for p in excludes]
    walked = list(_walk(model))
    everything = [(name, path, module) for name, path, module, _ in walked]
    names = [name for name, _, _ in everything if name]
    hit_inc = [False] * len(inc)
    hit_exc = [False] * len(exc)
    picked: list[tuple[str, str, nn.Module]] = []
    excluded_names: set[str] = set()
    seen: set[object] = set()
    for name, path, module, part in walked:
        included = False
        for i, (_, match) in enumerate(inc):
            if match(name, module):
                hit_inc[i] = included = True
        # Excludes are checked against every module, so a typo there is caught too.
        excluded = False
        for i, (_, match) in enumerate(exc):
            if match(name, module):
                hit_exc[i] = excluded = True
        if excluded:
            excluded_names.add(name)
        # A shared module is wrapped once, under its first name.
        key = id(module) if part is None else (id(part.owner_module), part.part)
        if included and not excluded and key not in seen:
            seen.add(key)
            picked.append((name, path, module))
    picked = _with_implied_parts(picked, walked, excluded_names)

    missing = [p for (p, _), hit in zip(inc, hit_inc) if not hit]
    missing_exc = [p for (p, _), hit in zip(exc, hit_exc) if not hit]
    if missing or missing_exc:
        present = sorted({type_name(type(m)) for _, _, m in everything})
        lines = []
        for kind, group in (("target", missing), ("exclude", missing_exc)):
            for p in group:
                hint = (f" Module types present: {present}." if isinstance(p, type)
                        else _suggest(p, names))
                lines.append(f"{kind} pattern {describe(p)} matches no module.{hint}")
        raise TargetError(
            "\n".join(lines) + "\nPatterns are globs over full dotted names from "
            "model.named_modules() (e.g. 'encoder.*.q_proj'); loraplug.find_targets(model, "
            "target) shows what a target selects."
        )

    # The root is a target only when it is itself a supported layer (a bare nn.Linear).
    picked = [item for item in picked if item[0] or lookup(type(item[2])) is not None]
    if any(name == "" for name, _, _ in picked):
        raise TargetError(
            f"target selects the model itself ({type_name(type(model))}), which cannot be "
            "replaced in place. Wrap it in a container, e.g. model = nn.Sequential(model), "
            "or target its children."
        )
    selection = Selection()
    for name, path, module in sorted(picked, key=lambda item: item[0]):
        if isinstance(module, LoRALayer) or lookup(type(module)) is not None:
            selection.modules[name] = module
            selection.paths[name] = path
        elif next(module.parameters(recurse=False), None) is not None:
            # Parameter-less matches (activations, containers) are not worth reporting.
            selection.unsupported[name] = type_name(type(module))
    if not selection.modules:
        found = sorted({type_name(type(m)) for _, _, m in picked})
        raise TargetError(
            f"target selects {len(picked)} module(s) but none of a supported type; types "
            f"selected: {found}. Supported: {supported_types()} and their subclasses. Target "
            "those layers, or register a LoRA layer for your type with "
            "loraplug.register_lora_layer."
        )
    return selection
