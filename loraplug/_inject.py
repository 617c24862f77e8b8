"""Putting LoRA layers into a model and taking them out again."""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor, nn

from ._adapters import active_adapters, check_mergeable, lora_layers
from ._config import validate_hyperparameters
from ._errors import ConfigError, LoRAError, LoRAWarning, StateError
from ._layer import LoRALayer
from ._parameter import LoRAParameter
from ._parameter_targeting import (
    ParameterTarget,
    ParamSpec,
    attach_parameter,
    parameter_problems,
    select_parameters,
    stage_parameters,
)
from ._registry import lookup, type_name
from ._targeting import TargetSpec, select


def find_targets(
    model: nn.Module, target: TargetSpec, *, exclude: TargetSpec | None = None
) -> list[str]:
    """Return the sorted names ``inject_lora`` would wrap, without changing anything.

    Raises the same errors as :func:`inject_lora` for the targets themselves.

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


def _module_paths(model: nn.Module) -> dict[int, list[str]]:
    # Every path a module object is reachable at (shared modules appear more than once).
    paths: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        paths[id(module)].append(path)
    return paths


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def _problems(
    model: nn.Module, name: str, module: nn.Module, paths: list[str], *, rank: int,
    dropout: float, adapter: str,
) -> list[tuple[type[LoRAError], str]]:
    found: list[tuple[type[LoRAError], str]] = []
    if isinstance(module, LoRALayer):
        if adapter in module.adapter_names:
            found.append((ConfigError, (
                f"{name!r} already has an adapter named {adapter!r}; choose another name "
                f"(name='...') or delete it first with loraplug.delete_adapter(model, "
                f"{adapter!r}).")))
        if module.merged:
            found.append((StateError, (
                f"{name!r} has {list(module.merged_adapters)} merged; call "
                "loraplug.unmerge(model) before adding an adapter.")))
        layer_cls = type(module)
    else:
        lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
        if lazy and module.has_uninitialized_params():
            found.append((StateError, (
                f"{name!r} is an uninitialised lazy module ({type_name(type(module))}); run one "
                "forward pass with a real input first so its shapes are known.")))
            return found
        layer_cls = lookup(type(module))[0]  # type: ignore[index]
    tensors: list[Tensor] = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if any(t.is_meta for t in tensors):
        found.append((StateError, (
            f"{name!r} has tensors on the meta device (no data); materialise the model first, "
            "e.g. model.to_empty(device='cpu') and load its weights, then inject.")))
        return found
    probe = module if isinstance(module, LoRALayer) else layer_cls(module, lookup(type(module))[1])  # type: ignore[index]
    why = probe.check_rank(rank)
    if why:
        found.append((ConfigError, f"{name!r} ({type_name(type(module))}): {why}"))
    if probe.through_weight and dropout > 0:
        found.append((ConfigError, (
            f"{name!r} is a {type_name(type(probe.base_layer))} whose forward differs from "
            f"{type_name(probe.registered_type)}'s, so its adapter is applied through the weight "
            f"(W + ΔW), where input dropout has no meaning; received dropout={dropout}. Use "
            "dropout=0.0, or register a LoRA layer for this type.")))
    return found


def inject_lora(
    model: nn.Module,
    *,
    target: TargetSpec | None = None,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    name: str = "default",
    exclude: TargetSpec | None = None,
    init: str = "kaiming",
    use_rslora: bool = False,
    freeze_base: bool = True,
    target_parameters: ParamSpec | None = None,
) -> list[str]:
    """Wrap the layers ``target`` names with LoRA adapters, in place.

    Each wrapped layer computes ``base(x) + (alpha / rank) · B A dropout(x)`` with A of
    shape ``(rank, in…)`` and B of shape ``(out, rank…)``; one of them starts at zero, so
    the model's outputs are unchanged until training moves them. On a layer that already
    carries adapters, ``name`` is added beside them. The first adapter of a model is
    active; later ones become active through :func:`set_adapter`.

    State-dict keys of the base model are kept (``fc.weight`` stays ``fc.weight``); the
    adapter adds ``fc.lora_A.<name>`` and ``fc.lora_B.<name>``.

    Args:
        model: any ``nn.Module``; changed in place.
        target: glob(s) over full module names, compiled regex(es), module type(s) or a
            predicate ``(name, module) -> bool``; see :func:`find_targets`.
        rank: r, the rank of the update (a positive int).
        alpha: scaling numerator; the update is scaled by ``alpha / rank``. ``None`` means
            ``alpha = rank`` (scaling 1).
        dropout: probability in [0, 1) of dropping inputs to the low-rank branch.
        name: the adapter's name (an identifier without dots).
        exclude: patterns, as for ``target``, to leave out.
        init: ``"kaiming"`` (Kaiming-uniform A, zero B) or ``"gaussian"`` (N(0, 1/r) A).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).
        freeze_base: set ``requires_grad=False`` on every parameter that is not a LoRA
            parameter, so only adapters train.

    Returns:
        The sorted names of the layers that received the adapter.

    Raises:
        ConfigError: a hyperparameter is invalid, a layer already has ``name``, or a
            grouped convolution cannot take ``rank``.
        TargetError: a pattern matches nothing or nothing supported matched; a
            parameter target belongs to the model itself or to a LoRA layer.
        StateError: a target is on the meta device, lazy and uninitialised, or merged.

    Warns:
        LoRAWarning: matched layers of unsupported types were skipped, or ``rank`` exceeds
            the rank ΔW can have on a layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(4, 8)
        >>> before = model(x)
        >>> lp.inject_lora(model, target=nn.Linear, rank=2, alpha=4)
        ['0', '2']
        >>> torch.equal(model(x), before)
        True
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.lora_A.default', '0.lora_B.default', '2.lora_A.default', '2.lora_B.default']
    """
    rank, alpha_value, dropout, name, init = validate_hyperparameters(
        rank=rank, alpha=alpha, dropout=dropout, name=name, init=init
    )
    for flag, value in (("use_rslora", use_rslora), ("freeze_base", freeze_base)):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be True or False; received {value!r}.")
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
                "a LoRA layer for a type with loraplug.register_lora_layer, take them through "
                "their weight with target_parameters=['<name>.weight'], or narrow the target.",
                LoRAWarning, stacklevel=2,
            )
        chosen.update(selection.modules)
    if target_parameters is not None:
        params = select_parameters(model, target_parameters)
        if params.unsupported:
            warnings.warn(
                "inject_lora skipped matched parameters of fewer than 2 dimensions: "
                f"{sorted(params.unsupported)}; they have no low-rank update.",
                LoRAWarning, stacklevel=2,
            )
        chosen.update(params.parameters)
    chosen = dict(sorted(chosen.items()))
    specs = {qualname: LayerSpec(rank, alpha_value) for qualname in chosen}
    inject_layers(model, chosen, specs, name=name, dropout=dropout, init=init,
                  use_rslora=use_rslora, freeze_base=freeze_base)
    return list(chosen)


@dataclass(frozen=True)
class LayerSpec:
    """Rank and alpha of one layer's adapter (they may differ per layer when loading)."""

    rank: int
    alpha: float


def inject_layers(
    model: nn.Module,
    modules: dict[str, nn.Module],
    specs: dict[str, LayerSpec],
    *,
    name: str,
    dropout: float,
    init: str,
    use_rslora: bool,
    freeze_base: bool,
) -> dict[str, LoRALayer]:
    """Add adapter ``name`` to ``modules`` (clean name -> module) with per-layer specs.

    Checks every layer first and raises before changing anything; returns the LoRA
    layers by name. Hyperparameters must already be validated.
    """
    all_paths = _module_paths(model)
    problems: list[tuple[type[LoRAError], str]] = []
    for qualname, module in modules.items():
        if isinstance(module, ParameterTarget):
            problems += parameter_problems(module, adapter=name, dropout=dropout)
            continue
        problems += _problems(model, qualname, module, all_paths[id(module)],
                              rank=specs[qualname].rank, dropout=dropout, adapter=name)
    if problems:
        kind = problems[0][0]
        raise kind("nothing was changed:\n" + "\n".join(m for _, m in problems))

    # Build every new layer and adapter before touching the model.
    staged: list[tuple[nn.Module, LoRALayer, Tensor, Tensor, LayerSpec]] = []
    too_large: list[str] = []
    param_layers = stage_parameters(
        {q: m for q, m in modules.items() if isinstance(m, ParameterTarget)})
    for qualname, module in modules.items():
        spec = specs[qualname]
        if isinstance(module, ParameterTarget):
            layer = param_layers[qualname]
            module = module.owner
        elif isinstance(module, LoRALayer):
            layer = module
        else:
            layer_cls, registered = lookup(type(module))  # type: ignore[misc]
            layer = layer_cls(module, registered)
        if spec.rank > layer.max_rank():
            too_large.append(f"{qualname} (rank {spec.rank}, at most {layer.max_rank()})")
        a, b = layer.new_adapter(spec.rank, init)
        staged.append((module, layer, a, b, spec))

    if too_large:  # before any change, so that warnings-as-errors change nothing either
        warnings.warn(
            f"the rank exceeds the rank ΔW can have on {', '.join(too_large)}; the extra "
            "parameters add cost without capacity. Consider a smaller rank.",
            LoRAWarning, stacklevel=3,
        )

    # New layers follow the model: its active set (the new adapter if none of the active
    # names exists any more) and its disabled state (inside disable_adapters).
    existing = lora_layers(model)
    known = {n for _, layer in existing for n in layer.adapter_names}
    active = [n for n in active_adapters(model) if n in known] or [name]
    disabled = any(layer.adapters_disabled for _, layer in existing)
    for module, layer, a, b, spec in staged:
        layer.add_adapter(name, a, b, alpha=spec.alpha, dropout=dropout, use_rslora=use_rslora)
        if isinstance(layer, LoRAParameter):
            if layer.parameter_name not in layer.host.lora_parameters:
                layer.set_active(active)
                layer.set_disabled(disabled)
            attach_parameter(model, module, layer, all_paths[id(module)])
        elif layer is not module:
            layer.set_active(active)
            layer.set_disabled(disabled)
            for path in all_paths[id(module)]:
                _set_module(model, path, layer)
    if active == [name]:
        for _, layer in existing:
            layer.set_active(active)

    if freeze_base:
        lora = {id(p) for _, layer in lora_layers(model)
                for store in (layer.lora_A, layer.lora_B) for p in store.values()}
        for p in model.parameters():
            if id(p) not in lora:
                p.requires_grad_(False)
    return {qualname: layer for qualname, (_, layer, *_rest) in zip(modules, staged)}


def unload(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Remove every LoRA layer, putting the original module objects back, in place.

    Args:
        model: a model with LoRA layers.
        merge: fold the active adapters into the weights first (a plain model that
            computes the adapted function); otherwise merged adapters are taken out and
            the base function is restored. A model that was never merged gets its
            original weights back bit for bit.

    Returns:
        ``model`` itself, now free of LoRA layers and state.

    ``requires_grad`` flags are left as they are (``freeze_base`` set them to False);
    call ``model.requires_grad_(True)`` to train the whole model again.

    Raises:
        StateError: ``merge`` is set while adapters are disabled, on a LoRA layer whose
            weight is tied to another module's, or on a model sharded by FSDP2.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> original = model[0]
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> lp.unload(model)[0] is original
        True
    """
    layers = lora_layers(model)
    if merge:
        check_mergeable(model, layers, "unload(merge=True)")
    all_paths = _module_paths(model)
    for _, layer in layers:
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        layer.sync_base()
        # A parameter's layer leaves with its host, which hands back the owner.
        host = layer.host if isinstance(layer, LoRAParameter) else layer
        for path in all_paths[id(host)]:
            _set_module(model, path, host.base_layer)
    return model
