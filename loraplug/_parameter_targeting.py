"""Which bare parameters a ``target_parameters`` specification names.

A parameter target is one of, or a list of:

- a glob over the parameter's full dotted name (``"*.experts.gate_up_proj"``,
  ``"block.0.custom.weight"``); ``*`` and ``?`` may cross dots;
- a compiled regex, matched with ``fullmatch`` against the full name;
- a predicate ``(name, parameter) -> bool``.

Full names are those of ``model.named_parameters()`` (without ``torch.compile``'s
``_orig_mod.``); the tensors of LoRA layers (their adapters, and the weights they
already adapt) are not candidates. Parameters of fewer than 2 dimensions have no
low-rank update and are skipped with a warning.

PEFT saves the adapters of several parameters of one module as nested wrappers: the
parameter registered first is innermost, so with parameters p₀ … pₙ₋₁ of a module at
``m`` adapted, pᵢ's tensors are ``m.`` + ``base_layer.`` × (n − 1 − i) + ``lora_A.weight``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor, nn

from ._errors import ConfigError, LoRAError, LoRAWarning, StateError, TargetError
from ._layer import LoRALayer
from ._options import PLAIN, AdapterOptions
from ._parameter import SLOT, LoRAParameter, LoRAParameterHost
from ._registry import type_name
from ._targeting import TargetSpec, candidates, select, set_module

ParamPattern = Union[str, "re.Pattern[str]", Callable[[str, Tensor], bool]]
ParamSpec = Union[ParamPattern, Sequence[ParamPattern]]


@dataclass(frozen=True)
class ParameterTarget:
    """One parameter of one module: where it lives and what holds it now."""

    owner_name: str  # clean name of the module that registers the parameter
    owner: nn.Module  # that module: the original, or the LoRAParameterHost standing in for it
    parameter: str  # its name in the owner

    @property
    def name(self) -> str:
        """The parameter's full dotted name."""
        return f"{self.owner_name}.{self.parameter}" if self.owner_name else self.parameter

    @property
    def layer(self) -> LoRAParameter | None:
        """The parameter's LoRA layer, when it already has one."""
        if isinstance(self.owner, LoRAParameterHost):
            return self.owner.layers().get(self.parameter)
        return None

    @property
    def value(self) -> Tensor:
        """The parameter itself."""
        params: dict[str, Any] = self.owner._parameters
        return params[self.parameter]


def parameter_candidates(model: nn.Module) -> dict[str, ParameterTarget]:
    """Full name -> target for every parameter a LoRA layer does not already own."""
    found: dict[str, ParameterTarget] = {}
    for clean, _, module in candidates(model):
        # A LoRA layer's own base tensors are listed (and refused at injection); its
        # adapters are not.
        own = module.base_layer._parameters if isinstance(module, LoRALayer) else None
        for key, value in module._parameters.items():
            if own is not None and key not in own:
                continue
            target = ParameterTarget(clean, module, key)
            if value is not None and target.name not in found:
                found[target.name] = target
    return found


def _matcher(pattern: ParamPattern) -> Callable[[str, Tensor], bool]:
    if isinstance(pattern, str):
        return lambda name, value: fnmatch.fnmatchcase(name, pattern)
    if isinstance(pattern, re.Pattern):
        return lambda name, value: pattern.fullmatch(name) is not None
    if callable(pattern) and not isinstance(pattern, type):
        return lambda name, value: bool(pattern(name, value))
    raise TargetError(
        f"target_parameters pattern {pattern!r} ({type(pattern).__name__}) is not a glob "
        "string, a compiled regex or a predicate (name, parameter) -> bool; name parameters "
        "by their full names, e.g. target_parameters=['*.experts.gate_up_proj']."
    )


def _as_list(spec: ParamSpec) -> list[ParamPattern]:
    if isinstance(spec, (str, re.Pattern)) or callable(spec):
        return [spec]
    if isinstance(spec, Sequence) and spec:
        return list(spec)
    raise TargetError(
        f"target_parameters received {spec!r}; expected a glob string, a compiled regex, a "
        "predicate (name, parameter) -> bool, or a non-empty list of these."
    )


@dataclass
class ParameterSelection:
    """What a ``target_parameters`` specification selects in a model."""

    #: full name -> target, for every selected parameter of 2 or more dimensions (sorted).
    parameters: dict[str, ParameterTarget] = field(default_factory=dict)
    #: full name -> shape, for selected parameters of fewer than 2 dimensions.
    unsupported: dict[str, tuple[int, ...]] = field(default_factory=dict)


def select_parameters(model: nn.Module, spec: ParamSpec) -> ParameterSelection:
    """Resolve ``spec`` against ``model``'s parameters; changes nothing.

    Raises:
        TargetError: a pattern matches no parameter (with close names), the spec is
            malformed, or nothing selected has 2 or more dimensions.
    """
    patterns = _as_list(spec)
    matchers = [_matcher(p) for p in patterns]
    everything = parameter_candidates(model)
    hits = [False] * len(matchers)
    selection = ParameterSelection()
    for name in sorted(everything):
        target = everything[name]
        value = target.value
        picked = False
        for i, match in enumerate(matchers):
            if match(name, value):
                hits[i] = picked = True
        if picked and value.dim() >= 2:
            selection.parameters[name] = target
        elif picked:
            selection.unsupported[name] = tuple(value.shape)
    missing = [p for p, hit in zip(patterns, hits) if not hit]
    if missing:
        names = sorted(everything)
        lines = []
        for pattern in missing:
            text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
            close = difflib.get_close_matches(text, names, n=5, cutoff=0.6) \
                if isinstance(text, str) else []
            hint = f" Close parameter names: {close}." if close else ""
            lines.append(f"target_parameters pattern {pattern!r} matches no parameter.{hint}")
        raise TargetError("\n".join(lines) + "\nPatterns are globs over full dotted names "
                          "from model.named_parameters(), e.g. '*.experts.gate_up_proj'.")
    if not selection.parameters:
        raise TargetError(
            f"target_parameters selects only parameters of fewer than 2 dimensions "
            f"({sorted(selection.unsupported)[:5]}), which have no low-rank update. Select "
            "weight matrices or stacks of them."
        )
    return selection


def peft_paths(targets: Sequence[ParameterTarget]) -> dict[str, str]:
    """Full parameter name -> the module path under which PEFT stores its A and B.

    PEFT nests one wrapper per adapted parameter of a module, the first registered
    innermost; each wrapper's tensors sit below its own ``base_layer.`` chain.
    """
    by_owner: dict[str, list[ParameterTarget]] = {}
    for target in targets:
        by_owner.setdefault(target.owner_name, []).append(target)
    paths: dict[str, str] = {}
    for owner_name, group in by_owner.items():
        order = list(group[0].owner._parameters)
        group = sorted(group, key=lambda t: order.index(t.parameter))
        for i, target in enumerate(group):
            prefix = f"{owner_name}." if owner_name else ""
            paths[target.name] = (prefix + "base_layer." * (len(group) - 1 - i)).rstrip(".")
    return paths


def parameter_problems(target: ParameterTarget, *, adapter: str, dropout: float,
                       options: AdapterOptions = PLAIN) -> list[tuple[type[LoRAError], str]]:
    """Why adapter ``adapter`` cannot go on ``target``; empty when it can."""
    name, owner = target.name, target.owner
    if isinstance(owner, LoRALayer):
        return [(TargetError, (
            f"{name!r} belongs to {target.owner_name!r}, already a {type(owner).__name__}; add "
            f"adapters to it with target={target.owner_name!r} instead."))]
    if not target.owner_name:
        return [(TargetError, (
            f"{name!r} is a parameter of the model itself ({type_name(type(owner))}), which "
            "cannot be replaced in place. Wrap it in a container, e.g. model = "
            "nn.Sequential(model)."))]
    found: list[tuple[type[LoRAError], str]] = []
    if not isinstance(owner, LoRAParameterHost) and hasattr(owner, SLOT):
        found.append((TargetError, (
            f"{target.owner_name!r} ({type_name(type(owner))}) has its own attribute {SLOT!r}, "
            "where loraplug keeps the layers of its adapted parameters; rename it.")))
    layer = target.layer
    if layer is not None and adapter in layer.adapter_names:
        found.append((ConfigError, (
            f"{name!r} already has an adapter named {adapter!r}; choose another name (name='...') "
            f"or delete it first with loraplug.delete_adapter(model, {adapter!r}).")))
    if layer is not None and layer.merged:
        found.append((StateError, (
            f"{name!r} has {list(layer.merged_adapters)} merged; call loraplug.unmerge(model) "
            "before adding an adapter.")))
    if target.value.is_meta:
        found.append((StateError, (
            f"{name!r} is on the meta device (no data); materialise the model first, e.g. "
            "model.to_empty(device='cpu') and load its weights, then inject.")))
    extras = [f"{k}={v!r}" for k, v in (("init", options.init), ("dora", options.dora),
                                          ("lora_bias", options.lora_bias))
              if v != getattr(PLAIN, k) and v != "gaussian"]
    if extras:
        found.append((ConfigError, (
            f"{name!r} is a bare parameter, which takes plain LoRA adapters (init 'kaiming' or "
            f"'gaussian', no DoRA, no bias on B); received {', '.join(extras)}. Adapt it in a "
            "separate inject_lora call without those options.")))
    if dropout > 0:
        kind = owner.base_layer if isinstance(owner, LoRAParameterHost) else owner
        found.append((ConfigError, (
            f"{name!r} is a bare parameter: its adapter acts through the weight (W + ΔW, seen by "
            f"{type_name(type(kind))}'s own forward), where input dropout has no meaning; "
            f"received dropout={dropout}. Use dropout=0.0.")))
    return found


def stage_parameters(targets: dict[str, ParameterTarget]) -> dict[str, LoRAParameter]:
    """A parameter layer for each target, none of them in the model yet.

    Parameters of one module share one host; a parameter that has a layer keeps it.
    """
    hosts: dict[int, LoRAParameterHost] = {}
    staged: dict[str, LoRAParameter] = {}
    for name, target in targets.items():
        owner = target.owner
        layer = target.layer
        if layer is None:
            host = owner if isinstance(owner, LoRAParameterHost) else \
                hosts.setdefault(id(owner), LoRAParameterHost(owner))
            layer = LoRAParameter(host, target.parameter)
        staged[name] = layer
    return staged


def attach_parameter(model: nn.Module, owner: nn.Module, layer: LoRAParameter,
                     paths: list[str]) -> None:
    """Put ``layer`` (and its host, at every path of ``owner``) into ``model``."""
    host = layer.host
    if host is not owner:  # the owner is still called (by the host): its hooks stay on it
        if model.get_submodule(paths[0]) is owner:  # children replaced since it was made
            host._modules.update(owner._modules)
        for path in paths:
            set_module(model, path, host)
    layers: nn.ModuleDict = getattr(host, SLOT)
    if layer.parameter_name not in layers:
        layers[layer.parameter_name] = layer


def parameter_names(layers: Sequence[tuple[str, LoRALayer]],
                    adapter: str) -> dict[str, tuple[str, str]]:
    """Layer path -> (path of its tensors in PEFT's files, full parameter name), for the
    parameter layers of ``layers`` that carry ``adapter``.

    PEFT nests the parameters of one module in registration order (see the module
    docstring), so a layer's key path depends on which of its host's parameters carry
    the adapter.
    """
    groups: dict[int, list[tuple[str, LoRAParameter]]] = {}
    for path, layer in layers:
        if isinstance(layer, LoRAParameter) and adapter in layer.adapter_names:
            groups.setdefault(id(layer.host), []).append((path, layer))
    names: dict[str, tuple[str, str]] = {}
    for group in groups.values():
        owner_name = group[0][0].rpartition(f".{SLOT}.")[0]
        host = group[0][1].host
        targets = [ParameterTarget(owner_name, host, layer.parameter_name) for _, layer in group]
        keys = peft_paths(targets)
        for (path, _), target in zip(group, targets):
            names[path] = (keys[target.name], target.name)
    return names


def peft_parameter_targets(model: nn.Module,
                           entries: Sequence[str]) -> dict[str, ParameterTarget]:
    """PEFT's ``target_parameters`` resolved in ``model``: key path -> parameter target.

    An entry names a parameter whose full name equals it or ends with ``"." + entry``
    (PEFT's rule); each matched parameter's tensors sit at :func:`peft_paths`.
    """
    everything = parameter_candidates(model)
    picked = [t for name, t in everything.items()
              if name in entries or any(name.endswith("." + e) for e in entries)]
    return {key: next(t for t in picked if t.name == name)
            for name, key in peft_paths(picked).items()}


def select_targets(
    model: nn.Module, target: TargetSpec | None, exclude: TargetSpec | None,
    target_parameters: ParamSpec | None,
) -> dict[str, nn.Module | ParameterTarget]:
    """The modules and parameters ``inject_lora`` adapts, by name, sorted; warns of skips.

    Raises:
        ConfigError: neither ``target`` nor ``target_parameters`` is given.
        TargetError: a pattern matches nothing, or nothing supported matched.
    """
    if target is None and target_parameters is None:
        raise ConfigError(
            "inject_lora needs target (modules, e.g. target=nn.Linear) or target_parameters "
            "(bare parameters, e.g. target_parameters=['*.experts.gate_up_proj']), or both."
        )
    chosen: dict[str, nn.Module | ParameterTarget] = {}
    if target is not None:
        selection = select(model, target, exclude)
        if selection.unsupported:
            skipped = ", ".join(f"{n} ({t})" for n, t in selection.unsupported.items())
            warnings.warn(
                f"inject_lora skipped matched modules of unsupported types: {skipped}. Register "
                "a LoRA layer for a type with loraplug.register_lora_layer, adapt its weight "
                "with target_parameters=['<name>.weight'], or narrow the target.",
                LoRAWarning, stacklevel=3,
            )
        chosen.update(selection.modules)
    if target_parameters is not None:
        params = select_parameters(model, target_parameters)
        if params.unsupported:
            warnings.warn(
                "inject_lora skipped matched parameters of fewer than 2 dimensions, which have "
                f"no low-rank update: {sorted(params.unsupported)}.", LoRAWarning, stacklevel=3,
            )
        chosen.update(params.parameters)
    return dict(sorted(chosen.items()))
