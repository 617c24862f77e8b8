"""Putting LoRA layers into a model and taking them out again."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ._adapters import active_adapters, check_mergeable, lora_layers
from ._bounded import memory_problem
from ._errors import ConfigError, LoRAError, LoRAWarning, StateError, TargetError
from ._extras import AdapterModule, adapter_modules, unwrap_modules
from ._extras_plan import apply_extras, plan_extras
from ._hooks import swap_hooks
from ._hyperparameters import check_flags, validate_hyperparameters
from ._inits import refuse_rewrite, rewrites_base
from ._layer import LoRALayer
from ._merging import merge as merge_all
from ._options import PLAIN, AdapterOptions, Staged, commit, option_problems, scaling, stage
from ._parameter import LoRAParameter
from ._parameter_targeting import (
    ParameterTarget,
    ParamSpec,
    attach_parameter,
    parameter_problems,
    select_targets,
    stage_parameters,
)
from ._parts import Part, layer_parts
from ._quantized import refuse_quantized
from ._registry import lora_layer_for, type_name
from ._targeting import TargetSpec, module_paths, parts_index, set_module
from ._weights import reading_weights


@dataclass(frozen=True)
class LayerSpec:
    """One layer's adapter hyperparameters (they may differ per layer when loading)."""

    rank: int
    alpha: float
    dropout: float


#: What a LoRA layer registers itself beside the wrapped module's tensors.
_LAYER_REGISTRIES = ("lora_A", "lora_B", "lora_dropout", "_lora_scales",
                     "lora_magnitude_vector", "lora_dora_norm", "lora_B_bias")


def injection_problems(
    model: nn.Module, name: str, module: nn.Module, paths: list[str], spec: LayerSpec, *,
    adapter: str, options: AdapterOptions = PLAIN,
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
    rank_why = probe.check_rank(spec.rank) or memory_problem(probe, spec.rank)
    for why in (rank_why, *option_problems(probe, spec.rank, options)):
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
    dora: bool = False,
    lora_bias: bool = False,
    modules_to_save: Sequence[str] | None = None,
    trainable_token_indices: Mapping[str, Sequence[int]] | None = None,
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
        init: ``"kaiming"`` (default), ``"gaussian"``, ``"orthogonal"`` (even rank),
            or ``"olora"``, ``"pissa"``, ``"pissa_niter_<k>"``, which **rewrite the base
            weight** to ``W − s·B A`` (see docs/peft_features.md).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).
        dora: a DoRA adapter (PEFT's ``use_dora``): a trained magnitude per output channel.
        lora_bias: a trained bias on B (PEFT's ``lora_bias``); not with ``dora``.
        modules_to_save: names or globs of modules trained in full, one copy per adapter
            (PEFT's ``modules_to_save``: a new classification head).
        trainable_token_indices: ``{embedding name: token ids}``: those rows train (and
            those of an output layer tied to the embedding), PEFT's option of that name.
        freeze_base: set ``requires_grad=False`` on every parameter that is not an
            adapter's, so only adapters (and their trained modules and rows) train.
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
        StateError: a target is on the meta device, lazy and uninitialised, or merged;
            or ``init`` rewrites a base weight that is tied to another module's.

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
    check_flags(use_rslora=use_rslora, dora=dora, lora_bias=lora_bias, freeze_base=freeze_base)
    options = AdapterOptions.checked(init, dora, lora_bias)
    chosen = select_targets(model, target, exclude, target_parameters)
    extras = plan_extras(model, name=name, modules_to_save=modules_to_save,
                         token_indices=trainable_token_indices,
                         lora_paths=[q for q, t in chosen.items()
                                     if not isinstance(t, ParameterTarget)])
    specs = {qualname: LayerSpec(rank, alpha_value, dropout) for qualname in chosen}
    inject_layers(model, chosen, specs, name=name, init=init,
                  use_rslora=use_rslora, freeze_base=freeze_base,
                  options=options)
    if extras.trained or extras.tokens:
        apply_extras(model, extras, name, active=active_adapters(model),
                     disabled=any(layer.adapters_disabled for _, layer in lora_layers(model)))
    return list(chosen)


@dataclass(frozen=True)
class _Staged:
    """A layer ready to take its new adapter: built, but not yet in the model."""

    module: nn.Module  # the module the layer replaces (a parameter's owner)
    layer: LoRALayer
    new: Staged
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
    options: AdapterOptions | None = None,
) -> dict[str, LoRALayer]:
    """Add adapter ``name`` to ``modules`` (name -> module or parameter) with per-layer specs.

    Checks every layer first and raises before changing anything (warnings too are
    given before any change, so that warnings-as-errors change nothing either); returns
    the LoRA layers by name. Hyperparameters must already be validated.
    """
    check_flags(use_rslora=use_rslora, freeze_base=freeze_base)
    options = options or AdapterOptions(init)
    paths = module_paths(model)
    owners_of = (m.owner if isinstance(m, ParameterTarget) else m for m in modules.values())
    with reading_weights(owners_of):
        staged, owned = _stage(model, modules, specs, paths, name=name, options=options,
                               use_rslora=use_rslora)
    _attach(model, staged, paths, owned, name=name, use_rslora=use_rslora, init=options.init)
    if freeze_base:
        holders: list[LoRALayer | AdapterModule] = [
            *(layer for _, layer in lora_layers(model)), *(m for _, m in adapter_modules(model))]
        lora = {id(p) for holder in holders for p in holder.adapter_parameters()}
        for p in model.parameters():
            if id(p) not in lora:
                p.requires_grad_(False)
    return {qualname: item.layer for qualname, item in staged.items()}


def _stage(model: nn.Module, modules: dict[str, nn.Module | ParameterTarget],
           specs: dict[str, LayerSpec], paths: dict[int, list[str]], *, name: str,
           options: AdapterOptions,
           use_rslora: bool) -> tuple[dict[str, _Staged], tuple[dict[str, Part], _Owners]]:
    # Check every layer, then build every new layer and adapter, before touching the model.
    problems: list[tuple[type[LoRAError], str]] = []
    for qualname, module in modules.items():
        if isinstance(module, ParameterTarget):
            problems += parameter_problems(module, adapter=name, dropout=specs[qualname].dropout,
                                           options=options)
        else:
            problems += injection_problems(model, qualname, module, paths.get(id(module), []),
                                           specs[qualname], adapter=name, options=options)
    if problems:
        kind = problems[0][0]
        raise kind("nothing was changed:\n" + "\n".join(m for _, m in problems))
    if rewrites_base(options.init):
        refuse_rewrite(model, {q: m for q, m in modules.items() if isinstance(m, nn.Module)},
                       options.init)
    parts, owners = parts_index(model), _Owners()
    staged: dict[str, _Staged] = {}
    params = stage_parameters({q: t for q, t in modules.items() if isinstance(t, ParameterTarget)})
    for qualname, target in modules.items():
        spec = specs[qualname]
        module = target.owner if isinstance(target, ParameterTarget) else target
        layer: LoRALayer = params[qualname] if qualname in params else \
            owners.layer_for(module, qualname in parts)
        new = stage(layer, spec.rank, scaling(spec.rank, spec.alpha, use_rslora), options)
        staged[qualname] = _Staged(module, layer, new, spec)
    too_large = [f"{q} (rank {s.spec.rank}, at most {s.layer.max_rank()})"
                 for q, s in staged.items() if s.spec.rank > s.layer.max_rank()]
    if too_large:
        warnings.warn(
            f"the rank exceeds the rank ΔW can have on {', '.join(too_large)}; the extra "
            "parameters add cost without capacity. Consider a smaller rank.",
            LoRAWarning, stacklevel=4,
        )
    return staged, (parts, owners)


def _attach(model: nn.Module, staged: dict[str, _Staged], paths: dict[int, list[str]],
            owned: tuple[dict[str, Part], _Owners], *, name: str, use_rslora: bool,
            init: str) -> None:
    # New layers follow the model: its active set (the new adapter if none of the active
    # names exists any more) and its disabled state (inside disable_adapters).
    existing = lora_layers(model)
    known = {n for _, layer in existing for n in layer.adapter_names}
    active = [n for n in active_adapters(model) if n in known] or [name]
    disabled = any(layer.adapters_disabled for _, layer in existing)
    parts, owners = owned
    for qualname, item in staged.items():
        layer = item.layer
        fresh = not layer.adapter_names
        layer.add_adapter(name, item.new.a, item.new.b, alpha=item.spec.alpha,
                          dropout=item.spec.dropout, use_rslora=use_rslora)
        commit(layer, name, item.new, init)
        if isinstance(layer, LoRAParameter):
            if fresh:  # a new layer follows the model
                layer.set_active(active)
                layer.set_disabled(disabled)
            attach_parameter(model, item.module, layer, paths[id(item.module)])
            continue
        if layer is item.module or owners.made(layer):
            continue
        layer.set_active(active)
        layer.set_disabled(disabled)
        part = parts.get(qualname)
        if part is not None:  # into its owner's LoRA layer (made below if new)
            owners.layer(part.owner_module).attach_part(part.part, layer)
        else:
            swap_hooks(item.module, layer)  # the module's hooks run on the layer now
            for path in paths[id(item.module)]:
                set_module(model, path, layer)
    for module, layer in owners.new.values():  # new owners' layers, in the owners' places
        layer.set_active(active)
        layer.set_disabled(disabled)
        swap_hooks(module, layer)
        for path in paths[id(module)]:
            set_module(model, path, layer)
    if active == [name]:
        for _, layer in existing:
            layer.set_active(active)


class _Owners:
    """The LoRA layers of modules with parts (attention), each made once."""

    def __init__(self) -> None:
        self.new: dict[int, tuple[nn.Module, LoRALayer]] = {}

    def layer_for(self, module: nn.Module, is_part: bool) -> LoRALayer:
        """The layer that takes ``module``'s adapter: an owner's is shared with its parts."""
        if is_part or isinstance(module, LoRALayer) or not layer_parts(module):
            return lora_layer_for(module)
        return self.layer(module)

    def layer(self, module: nn.Module) -> LoRALayer:
        """``module``'s LoRA layer: itself when it is one, else one made once."""
        if isinstance(module, LoRALayer):
            return module
        if id(module) not in self.new:
            self.new[id(module)] = (module, lora_layer_for(module))
        return self.new[id(module)][1]

    def made(self, layer: LoRALayer) -> bool:
        return any(made is layer for _, made in self.new.values())


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
    lora_paths = {path for _, layer in layers for path in paths[id(layer)]}
    if not merge:
        for _, layer in reversed(layers):  # last merged, first out (see unmerge)
            layer.unmerge()
    def host_of(layer: LoRALayer) -> nn.Module:
        # A parameter's layer leaves with its host, which hands back the owner.
        return layer.host if isinstance(layer, LoRAParameter) else layer

    def depth(item: tuple[str, LoRALayer]) -> int:
        return -max((p.count(".") + 1 for p in paths.get(id(host_of(item[1])), [])), default=0)

    gone: set[int] = set()
    # Innermost first, so that an owner's host takes its children back before it leaves.
    for _, layer in sorted(layers, key=depth):
        layer.sync_base()
        host = host_of(layer)
        if id(host) in gone:
            continue
        gone.add(id(host))
        base = host.__dict__["base_layer"]  # the module it stands in for
        if host is layer:
            swap_hooks(base, host)  # hooks go back to the module
        for path in paths[id(host)]:
            # A part (inside another LoRA layer) leaves with its owner's layer.
            if path.rpartition(".")[0] not in lora_paths:
                set_module(model, path, base)
    unwrap_modules(model, merge=merge)
    return model
