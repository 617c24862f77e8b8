"""Putting LoRA layers into a model and taking them out again."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import Tensor, nn

from ._adapter_set import usable_name
from ._adapters import active_adapters, check_mergeable, lora_layers
from ._bounded import ALPHA_RANGE, MAX_RANK, alpha_ok, memory_problem, rank_ok
from ._bounded import short_repr as _short
from ._errors import ConfigError, LoRAError, LoRAWarning, StateError, TargetError
from ._hooks import swap_hooks
from ._layer import LoRALayer
from ._merging import merge as merge_all
from ._parameter import LoRAParameter
from ._parameter_targeting import (
    ParameterTarget,
    ParamSpec,
    attach_parameter,
    parameter_problems,
    select_targets,
    stage_parameters,
)
from ._quantized import refuse_quantized
from ._registry import lora_layer_for, type_name
from ._targeting import TargetSpec, module_paths, set_module
from ._weights import reading_weights


@dataclass(frozen=True)
class LayerSpec:
    """One layer's adapter hyperparameters (they may differ per layer when loading)."""

    rank: int
    alpha: float
    dropout: float


def validate_name(name: object) -> str:
    """Check an adapter name: any non-empty string without dots that torch can use as a key.

    Raises:
        ConfigError: ``name`` is not such a string.
    """
    if not usable_name(name):
        raise ConfigError(
            f"adapter name must be a non-empty string without dots that is not an attribute "
            f"of nn.ModuleDict or nn.ParameterDict (such as 'keys', 'copy' or 'training'); "
            f"received {name!r}. Use names like 'default', 'style_b' or 'adapter-2'."
        )
    return str(name)


def validate_hyperparameters(
    *, rank: object, alpha: object, dropout: object, name: object, init: object
) -> tuple[int, float, float, str, str]:
    """Check the hyperparameters shared by every layer; returns them normalised.

    Raises:
        ConfigError: a value is of the wrong type or out of range.
    """
    if not rank_ok(rank):
        raise ConfigError(
            f"rank must be a positive int; received {_short(rank)}. Typical ranks are 4 to "
            f"64, e.g. rank=8 (at most {MAX_RANK})."
        )
    if alpha is None:
        alpha = rank
    if not alpha_ok(alpha):
        raise ConfigError(
            f"alpha must be a finite number > 0; received {_short(alpha)}. The scaling is "
            "alpha / rank, computed in the weights' dtype, so alpha must fit a float32 "
            f"({ALPHA_RANGE[0]:.4g} to {ALPHA_RANGE[1]:.4g}); alpha=None means alpha = rank "
            "(scaling 1)."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ConfigError(
            f"dropout must be a number in [0, 1); received {_short(dropout)}. Use 0.0 for "
            "none, e.g. dropout=0.05."
        )
    name = validate_name(name)
    if init not in ("kaiming", "gaussian"):
        raise ConfigError(
            f"init must be 'kaiming' or 'gaussian'; received {init!r}."
        )
    return rank, float(alpha), float(dropout), name, str(init)


def check_flags(**flags: object) -> None:
    """Check that each flag is True or False (not a truthy string such as "no").

    Raises:
        ConfigError: a flag is something else.
    """
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be True or False; received {value!r}.")


#: What a LoRA layer registers itself beside the wrapped module's tensors.
_LAYER_REGISTRIES = ("lora_A", "lora_B", "lora_dropout", "_lora_scales")


def injection_problems(
    model: nn.Module, name: str, module: nn.Module, paths: list[str], spec: LayerSpec, *,
    adapter: str,
) -> list[tuple[type[LoRAError], str]]:
    """Why adapter ``adapter`` with ``spec`` cannot go on ``module`` (clean name ``name``).

    ``paths`` are the module's real paths (see ``module_paths``). Each problem comes with
    the error type ``inject_lora`` raises for it; an empty list means the layer is fine.
    """
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
    elif isinstance(module, nn.modules.lazy.LazyModuleMixin) \
            and module.has_uninitialized_params():
        found.append((StateError, (
            f"{name!r} is an uninitialised lazy module ({type_name(type(module))}); run one "
            "forward pass with a real input first so its shapes are known.")))
        return found
    tensors: list[Tensor] = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if any(t.is_meta for t in tensors):
        found.append((StateError, (
            f"{name!r} has tensors on the meta device (no data); materialise the model first, "
            "e.g. model.to_empty(device='cpu') and load its weights, then inject.")))
        return found
    probe = lora_layer_for(module)
    taken = [] if probe is module else [
        n for n in (*module._parameters, *module._buffers, *module._modules)
        if n in vars(probe) or n in _LAYER_REGISTRIES]
    if taken:
        found.append((TargetError, (
            f"{name!r} ({type_name(type(module))}) has parameters, buffers or children named "
            f"{taken}, names a LoRA layer uses for its own state (rank, alpha, scaling, "
            "lora_A, ... per adapter), so it would hide them. Rename them in the module, or "
            f"leave the layer out (exclude=[{name!r}]).")))
    why = probe.check_rank(spec.rank) or memory_problem(probe, spec.rank)
    if why:
        found.append((ConfigError, f"{name!r} ({type_name(type(module))}): {why}"))
    if probe.forward_differs and spec.dropout > 0:
        found.append((ConfigError, (
            f"{name!r} is a {type_name(type(probe.base_layer))} whose forward differs from "
            f"{type_name(probe.registered_type)}'s, so its adapter is applied through the weight "
            f"(W + ΔW), where input dropout has no meaning; received dropout={spec.dropout}. "
            "Use dropout=0.0, or register a LoRA layer for this type.")))
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
        name: the adapter's name: a string without dots, not an attribute name of
            ``nn.ParameterDict`` (such as "keys").
        exclude: patterns, as for ``target``, to leave out.
        init: ``"kaiming"`` (Kaiming-uniform A, zero B) or ``"gaussian"`` (N(0, 1/r) A).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).
        freeze_base: set ``requires_grad=False`` on every parameter that is not a LoRA
            parameter, so only adapters train.
        target_parameters: glob(s) over full parameter names (``"*.experts.gate_up_proj"``),
            compiled regex(es) or a predicate ``(name, parameter) -> bool``: bare
            parameters of 2 or more dimensions (MoE expert stacks, any module's weight),
            each adapted through the weight: its module's own forward runs on ``W + ΔW``
            (layouts: :class:`LoRAParameter`). ``target`` or ``target_parameters`` (or
            both) must be given.

    Returns:
        The sorted names of the layers (and parameters) that received the adapter.

    Raises:
        ConfigError: a hyperparameter is invalid, neither ``target`` nor
            ``target_parameters`` is given, a layer already has ``name``, or dropout is
            asked of an adapter computed through the weight.
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
    check_flags(use_rslora=use_rslora, freeze_base=freeze_base)
    chosen = select_targets(model, target, exclude, target_parameters)
    specs = {qualname: LayerSpec(rank, alpha_value, dropout) for qualname in chosen}
    inject_layers(model, chosen, specs, name=name, init=init,
                  use_rslora=use_rslora, freeze_base=freeze_base)
    return list(chosen)


@dataclass(frozen=True)
class _Staged:
    """A layer ready to take its new adapter: built, but not yet in the model."""

    module: nn.Module  # the module the layer replaces (a parameter's owner)
    layer: LoRALayer
    a: Tensor
    b: Tensor
    spec: LayerSpec


def inject_layers(
    model: nn.Module,
    modules: dict[str, nn.Module | ParameterTarget],
    specs: dict[str, LayerSpec],
    *,
    name: str,
    init: str,
    use_rslora: bool,
    freeze_base: bool,
) -> dict[str, LoRALayer]:
    """Add adapter ``name`` to ``modules`` (name -> module or parameter) with per-layer specs.

    Checks every layer first and raises before changing anything (warnings too are
    given before any change, so that warnings-as-errors change nothing either); returns
    the LoRA layers by name. Hyperparameters must already be validated.
    """
    check_flags(use_rslora=use_rslora, freeze_base=freeze_base)
    paths = module_paths(model)
    with reading_weights(m.owner if isinstance(m, ParameterTarget) else m
                         for m in modules.values()):
        staged = _stage(model, modules, specs, paths, name=name, init=init)
    _attach(model, list(staged.values()), paths, name=name, use_rslora=use_rslora)
    if freeze_base:
        lora = {id(p) for _, layer in lora_layers(model)
                for store in (layer.lora_A, layer.lora_B) for p in store.values()}
        for p in model.parameters():
            if id(p) not in lora:
                p.requires_grad_(False)
    return {qualname: item.layer for qualname, item in staged.items()}


def _stage(model: nn.Module, modules: dict[str, nn.Module | ParameterTarget],
           specs: dict[str, LayerSpec],
           paths: dict[int, list[str]], *, name: str, init: str) -> dict[str, _Staged]:
    # Check every layer, then build every new layer and adapter, before touching the model.
    problems: list[tuple[type[LoRAError], str]] = []
    for qualname, module in modules.items():
        if isinstance(module, ParameterTarget):
            problems += parameter_problems(module, adapter=name, dropout=specs[qualname].dropout)
        else:
            problems += injection_problems(model, qualname, module, paths[id(module)],
                                           specs[qualname], adapter=name)
    if problems:
        kind = problems[0][0]
        raise kind("nothing was changed:\n" + "\n".join(m for _, m in problems))
    staged: dict[str, _Staged] = {}
    params = stage_parameters({q: t for q, t in modules.items() if isinstance(t, ParameterTarget)})
    for qualname, target in modules.items():
        spec = specs[qualname]
        module = target.owner if isinstance(target, ParameterTarget) else target
        layer = params[qualname] if qualname in params else lora_layer_for(module)
        staged[qualname] = _Staged(module, layer, *layer.new_adapter(spec.rank, init), spec)
    too_large = [f"{q} (rank {s.spec.rank}, at most {s.layer.max_rank()})"
                 for q, s in staged.items() if s.spec.rank > s.layer.max_rank()]
    if too_large:
        warnings.warn(
            f"the rank exceeds the rank ΔW can have on {', '.join(too_large)}; the extra "
            "parameters add cost without capacity. Consider a smaller rank.",
            LoRAWarning, stacklevel=4,
        )
    return staged


def _attach(model: nn.Module, staged: list[_Staged], paths: dict[int, list[str]], *,
            name: str, use_rslora: bool) -> None:
    # New layers follow the model: its active set (the new adapter if none of the active
    # names exists any more) and its disabled state (inside disable_adapters).
    existing = lora_layers(model)
    known = {n for _, layer in existing for n in layer.adapter_names}
    active = [n for n in active_adapters(model) if n in known] or [name]
    disabled = any(layer.adapters_disabled for _, layer in existing)
    for item in staged:
        layer = item.layer
        if not layer.adapter_names:  # a new layer follows the model
            layer.set_active(active)
            layer.set_disabled(disabled)
        layer.add_adapter(name, item.a, item.b, alpha=item.spec.alpha,
                          dropout=item.spec.dropout, use_rslora=use_rslora)
        if isinstance(layer, LoRAParameter):
            attach_parameter(model, item.module, layer, paths[id(item.module)])
        elif layer is not item.module:
            swap_hooks(item.module, layer)  # the module's hooks run on the layer now
            for path in paths[id(item.module)]:
                set_module(model, path, layer)
    if active == [name]:
        for _, layer in existing:
            layer.set_active(active)


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
            weight is tied to another module's, computed by a hook or parametrized by
            something that cannot hold the merged weight, on a model sharded by FSDP2, or
            with adapters whose merged weight would hold NaN or inf, or on an unmerged
            layer with a quantized weight (``merge(model, requantize=True)`` first); nothing
            is changed then.

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
    if merge and layers:
        check_mergeable(model, layers, "unload(merge=True)")
        refuse_quantized(layers, "unload(merge=True)")
        merge_all(model, exact=False)  # every layer or none; they leave: nothing is kept
    paths = module_paths(model)
    for _, layer in layers:
        if not merge:
            layer.unmerge()
        layer.sync_base()
        # A parameter's layer leaves with its host, which hands back the owner.
        host = layer.host if isinstance(layer, LoRAParameter) else layer
        if host is layer:
            swap_hooks(layer.base_layer, layer)  # hooks go back to the module
        for path in paths[id(host)]:
            set_module(model, path, host.base_layer)
    return model
