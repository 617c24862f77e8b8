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
inside a LoRA layer (its adapters, dropouts) are never candidates; parts of a module
(``<attention>.q``, ``.k``, ``.v``, ``.out_proj``) are (see ``_parts``). A module that
reads a layer's weight in its own forward instead of calling it sees ``W + ΔW`` (see
``_owner_reads``). This module also finds and replaces modules by path.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import reprlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

from torch import nn

from ._errors import ConfigError, TargetError
from ._layer import LoRALayer
from ._parts import Part, walk, with_implied_parts
from ._registry import lookup, supported_types, type_name

Pattern = Union[str, "re.Pattern[str]", type, Callable[[str, nn.Module], bool]]
TargetSpec = Union[Pattern, Sequence[Pattern]]

_COMPILE_PREFIX = "_orig_mod."


def clean_name(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` inserts."""
    return name.replace(_COMPILE_PREFIX, "") if _COMPILE_PREFIX in name else name


def check_model(model: object) -> None:
    """Raise unless ``model`` is an ``nn.Module``.

    Raises:
        ConfigError: it is something else.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module; received {type(model).__name__} "
            f"{reprlib.repr(model)}. Pass the model object itself (model, not model.state_dict() "
            "or a path)."
        )


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path each module object is reachable at, by ``id`` (shared modules have several)."""
    paths: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(path)
    return paths


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the real (uncleaned) ``path`` inside ``model``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def candidates(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(clean name, real path, module) for every module at every path it is reachable at.

    A module shared by several parents appears once per path; LoRA internals are skipped.
    Parts of a module (q, k, v and out_proj of an attention, see ``_parts``) appear as
    ``<module>.<part>``, whether or not a module of that name exists yet.
    """
    for name, path, module, _ in walk(model, clean_name):
        yield name, path, module


def parts_index(model: nn.Module) -> dict[str, Part]:
    """Clean name of every part candidate -> where it belongs."""
    return {name: part for name, _, _, part in walk(model, clean_name) if part is not None}


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


@dataclass
class Selection:
    """What a target specification selects in a model."""

    #: clean name -> module, for every supported module selected (sorted by name).
    modules: dict[str, nn.Module] = field(default_factory=dict)
    #: clean name -> real path (differs on compiled models).
    paths: dict[str, str] = field(default_factory=dict)
    #: clean name -> type name, for selected modules no LoRA layer is registered for.
    unsupported: dict[str, str] = field(default_factory=dict)


class _Patterns:
    """Patterns with their matchers, remembering which of them ever matched."""

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = patterns
        self.matchers = [_matcher(p) for p in patterns]
        self.hit = [False] * len(patterns)

    def match(self, name: str, module: nn.Module) -> bool:
        # Every pattern is tried on every module, so that each one's hits are known.
        found = False
        for i, matcher in enumerate(self.matchers):
            if matcher(name, module):
                self.hit[i] = found = True
        return found

    def missed(self) -> list[Pattern]:
        return [p for p, hit in zip(self.patterns, self.hit) if not hit]


def _supported(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer) or lookup(type(module)) is not None


def select(model: nn.Module, target: TargetSpec, exclude: TargetSpec | None = None) -> Selection:
    """Resolve ``target`` minus ``exclude`` against ``model``; changes nothing.

    Raises:
        TargetError: a pattern matches no module (with close names), the spec is
            malformed, or nothing selected has a registered LoRA layer.
    """
    check_model(model)
    includes = _as_list(target)
    _refuse_instances(model, {"target": includes, "exclude": _as_list(exclude)})
    if not includes:
        raise TargetError(
            "target is empty; name the layers to adapt, e.g. target=['classifier.*'] or "
            "target=nn.Linear."
        )
    inc, exc = _Patterns(includes), _Patterns(_as_list(exclude))
    walked = list(walk(model, clean_name))
    everything = [(name, path, module) for name, path, module, _ in walked]
    picked: list[tuple[str, str, nn.Module]] = []
    removed: list[str] = []  # selected by target, then taken out by exclude
    excluded_names: set[str] = set()
    seen: set[object] = set()
    for name, path, module, part in walked:
        included = inc.match(name, module)
        # Excludes are checked against every module, so a typo there is caught too.
        if exc.match(name, module):
            excluded_names.add(name)
            if included and name and _supported(module):
                removed.append(name)
        # A shared module is wrapped once, under its first name.
        key = id(module) if part is None else (id(part.owner_module), part.part)
        if included and name not in excluded_names and key not in seen:
            seen.add(key)
            picked.append((name, path, module))
    if inc.missed() or exc.missed():
        raise _unmatched(everything, inc.missed(), exc.missed())
    picked = with_implied_parts(picked, walked, excluded_names)
    if removed and not any(_supported(m) for name, _, m in picked if name):
        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5
                                          else "")
        raise TargetError(
            f"exclude {', '.join(describe(p) for p in exc.patterns)} removes every layer of a "
            f"supported type that target selects ({shown}), so nothing is left to adapt. "
            "Narrow the exclude or "
            "widen the target; loraplug.find_targets(model, target) shows what a target selects."
        )
    # The root is a target only when it is itself a supported layer (a bare nn.Linear).
    picked = [item for item in picked if item[0] or lookup(type(item[2])) is not None]
    if any(name == "" for name, _, _ in picked):
        raise TargetError(
            f"target selects the model itself ({type_name(type(model))}), which cannot be "
            "replaced in place. Wrap it in a container, e.g. model = nn.Sequential(model), "
            "or target its children."
        )
    return _selection(picked)


def _refuse_instances(model: nn.Module, specs: dict[str, list[Pattern]]) -> None:
    # A module object is callable, so it would pass for a predicate; name it instead.
    for kind, patterns in specs.items():
        for p in patterns:
            if isinstance(p, nn.Module):
                names = [clean_name(n) for n, m in model.named_modules() if m is p]
                hint = (f"It is {names[0]!r} in the model: pass {kind}={names[0]!r}" if names
                        else "It is not in the model; pass a name from model.named_modules()")
                raise TargetError(
                    f"{kind} received a module object ({type_name(type(p))}), not a pattern. "
                    f"{hint}, or its type ({type_name(type(p))}) for every such module."
                )


def _unmatched(everything: list[tuple[str, str, nn.Module]], missing: list[Pattern],
               missing_exc: list[Pattern]) -> TargetError:
    names = [name for name, _, _ in everything if name]
    present = sorted({type_name(type(m)) for _, _, m in everything})
    lines = []
    for kind, group in (("target", missing), ("exclude", missing_exc)):
        for p in group:
            hint = (f" Module types present: {present}." if isinstance(p, type)
                    else _suggest(p, names))
            lines.append(f"{kind} pattern {describe(p)} matches no module.{hint}")
    return TargetError(
        "\n".join(lines) + "\nPatterns are globs over full dotted names from "
        "model.named_modules() (e.g. 'encoder.*.q_proj'); loraplug.find_targets(model, "
        "target) shows what a target selects."
    )


def _selection(picked: list[tuple[str, str, nn.Module]]) -> Selection:
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


def find_targets(
    model: nn.Module, target: TargetSpec, *, exclude: TargetSpec | None = None
) -> list[str]:
    """Return the sorted names ``inject_lora`` would wrap, without changing anything.

    Raises the same errors as :func:`inject_lora` for the targets themselves. A layer
    whose owner reads its weight instead of calling it is a target like any other: the
    owner is handed ``W + ΔW`` (see the concepts page).

    Args:
        model: any ``nn.Module``; not changed.
        target: glob(s), compiled regex(es), module type(s) or a predicate
            ``(name, module) -> bool``; see the targeting docs.
        exclude: patterns, as for ``target``, to leave out.

    Returns:
        The sorted names of the layers that would receive an adapter.

    Raises:
        TargetError: a pattern matches nothing, or nothing supported matched.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> lp.find_targets(model, nn.Linear, exclude="2")
        ['0']
    """
    return list(select(model, target, exclude).modules)
