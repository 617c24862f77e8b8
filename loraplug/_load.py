"""Loading: adapter directories, ours and PEFT's, and adapter state dicts.

``load_adapter`` reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``, through ``torch.load(weights_only=True)`` only: nothing is
ever unpickled), checks every key, shape and config field against the model, and reports
every problem in one :class:`AdapterFileError` before anything changes (warnings too come
first). ``load_adapter_state_dict`` fills an adapter already on the model the same way.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from ._adapters import active_adapters, adapter_names, lora_layers
from ._errors import AdapterFileError, ConfigError, LoRAWarning, StateError
from ._extras_files import TrainedExtras, fill_extras, read_extras, state_extras
from ._format import (
    CONFIG_NAME,
    FileExtras,
    Slots,
    extra_tensors,
    fitted_tensors,
    index_keys,
    key_names,
    layer_tensors,
    locate,
    other_key_problems,
    pair_problems,
    part_factor,
    read_adapter_weights,
    read_config,
    read_metadata,
    report,
)
from ._hyperparameters import validate_name
from ._inject import LayerSpec, inject_layers, injection_problems
from ._layer import LoRALayer
from ._lock import locked
from ._parameter import LoRAParameter, LoRAParameterHost
from ._parameter_targeting import (
    ParameterTarget,
    parameter_names,
    parameter_problems,
    peft_parameter_targets,
)
from ._paths import as_path
from ._peft_config import PeftLoRAConfig, parse_config
from ._regex import RegexRefused, work_limit
from ._registry import lora_layer_for, lora_layer_type, supported_types, type_name
from ._rng import rng_untouched
from ._shared_paths import shared_module_problems
from ._targeting import candidates, module_paths, parts_index
from ._variant_files import adapter_variant_problems, fill_variants, variant_problems
from ._weights import reading_weights

T = TypeVar("T")


@dataclass(frozen=True)
class _Planned:
    """One layer of a file to load: where it goes, its hyperparameters and its tensors."""

    module: nn.Module | ParameterTarget
    spec: LayerSpec
    a: Tensor
    b: Tensor
    extra: dict[str, Tensor]  # the DoRA magnitude ("M") and B's bias ("bias"), if any


def _matched(entries: dict[str, Slots], targets: dict[str, T], problems: list[str],
             missing: str) -> Iterator[tuple[str, Slots, T]]:
    """(path, slots, target) for each entry in path order; a path without a target is a
    problem (``missing``, with the close names)."""
    for path, slots in sorted(entries.items()):
        target = targets.get(path)
        if target is None:
            close = difflib.get_close_matches(path, sorted(targets), n=3, cutoff=0.6)
            problems.append(f"{path}: {missing}"
                            + (f" Close module names: {close}." if close else ""))
            continue
        yield path, slots, target


def _layer_class(module: nn.Module) -> type[LoRALayer] | None:
    return type(module) if isinstance(module, LoRALayer) else lora_layer_type(type(module))


def _plan_layer(model: nn.Module, config: PeftLoRAConfig, path: str, module: nn.Module,
                paths: list[str], slots: Slots, *, dropout: float, adapter: str,
                owner: str | None) -> tuple[_Planned | None, list[str]]:
    """The plan for one layer of the file, or ``None``; and the problems found.

    ``owner`` names the module a part belongs to (targeting it targets the part too).
    """
    layer_cls = _layer_class(module)
    if layer_cls is None:
        return None, [f"{path} is a {type_name(type(module))}, which has no LoRA layer; "
                      f"supported: {supported_types()} and their subclasses."]
    problems = []
    if not (config.targets(path) or (owner is not None and config.targets(owner))):
        problems.append(
            f"{path}: the file has tensors for it, but target_modules / exclude_modules in "
            f"{CONFIG_NAME} do not select it."
        )
    rank, alpha, source = config.spec(path)
    spec = LayerSpec(rank, alpha, dropout)
    blockers = injection_problems(model, path, module, paths, spec, adapter=adapter,
                                  options=config.options)
    if isinstance(module, LoRALayer) and adapter in module.adapter_names:
        # A taken name is reported once, for the whole model (_name_problems).
        blockers = [b for b in blockers if "already has an adapter named" not in b[1]]
    problems += [message for _, message in blockers]
    tensors, found = layer_tensors(path, layer_cls, slots)
    extra, found_extra = extra_tensors(path, slots)
    problems += found + found_extra
    if tensors is None or any(kind is StateError for kind, _ in blockers):
        return None, problems
    probe = lora_layer_for(module)
    fitted, shape_problem = fitted_tensors(path, probe, tensors, rank, source)
    problems += [shape_problem] if shape_problem else []
    problems += variant_problems(path, probe, extra, dora=config.dora,
                                 lora_bias=config.lora_bias)
    if fitted is None:
        return None, problems
    if "M" in extra and tuple(fitted[0].shape) != tuple(probe.adapter_shapes(rank)[0]):
        problems.append(
            f"{path}: a DoRA magnitude needs ΔW in the weight's own shape, but A "
            f"{tuple(fitted[0].shape)} is in another layout (PEFT's for a grouped "
            "convolution: A reads every input channel), whose ΔW has no such shape. Train "
            "this layer without DoRA, or with loraplug's layout."
        )
        return None, problems
    return _Planned(module, spec, *fitted, extra), problems


def _plan_parameters(model: nn.Module, config: PeftLoRAConfig, entries: dict[str, Slots],
                     dropouts: dict[str, float], adapter: str) -> tuple[
                         dict[str, _Planned], list[str]]:
    """The plan for ``target_parameters``; their entries are taken out of ``entries``."""
    plan: dict[str, _Planned] = {}
    problems: list[str] = []
    for key_path, target in peft_parameter_targets(model, config.target_parameters).items():
        slots = entries.pop(key_path, None)
        if slots is None:
            problems.append(f"{target.name}: target_parameters selects it, but the file lacks "
                            f"{key_path}.lora_A.weight and {key_path}.lora_B.weight.")
            continue
        rank, alpha, source = config.spec(target.name)
        spec = LayerSpec(rank, alpha, float(dropouts.get(target.name, config.dropout)))
        blockers = parameter_problems(target, adapter=adapter, dropout=spec.dropout,
                                      options=config.options)
        problems += [message for _, message in blockers]
        tensors, found = layer_tensors(key_path, LoRAParameter, slots)
        problems += found
        if tensors is None or blockers:
            continue
        probe = target.layer or LoRAParameter(LoRAParameterHost(target.owner), target.parameter)
        fitted, shape_problem = fitted_tensors(key_path, probe, tensors, rank, source)
        if fitted is None:
            problems.append(str(shape_problem))
            continue
        plan[target.name] = _Planned(target, spec, *fitted, {})
    return plan, problems


def _plan(model: nn.Module, config: PeftLoRAConfig, entries: dict[str, Slots],
          extras: FileExtras, adapter: str) -> tuple[dict[str, _Planned], list[str]]:
    everything = {clean: module for clean, _, module in candidates(model) if clean}
    paths, parts = module_paths(model), parts_index(model)
    dropouts = extras.get("dropout", {})
    entries = dict(entries)
    plan, problems = _plan_parameters(model, config, entries, dropouts, adapter)
    for path, slots, module in _matched(entries, everything, problems,
                                        "the model has no module of that name."):
        part = parts.get(path)
        planned, found = _plan_layer(
            model, config, path, module, paths.get(id(module), []), slots,
            dropout=float(dropouts.get(path, config.dropout)), adapter=adapter,
            owner=None if part is None else part.owner)
        problems += found
        if planned is not None:
            plan[path] = planned
    problems += shared_module_problems(plan)
    if config.names_explicitly():
        loaded = {id(item.module) for item in plan.values()}
        for path, module in everything.items():
            layer_cls = _layer_class(module)
            # (a part that is no module of its own, attention's q, is not PEFT's to target)
            if path in entries or id(module) in loaded or not config.targets(path) \
                    or layer_cls is None or id(module) not in paths:
                continue
            key_a, key_b = key_names(layer_cls)
            problems.append(f"{path}: target_modules selects it, but the file lacks "
                            f"{path}.{key_a} and {path}.{key_b}.")
    return plan, problems


def _name_problems(model: nn.Module, adapter: str) -> list[str]:
    try:
        validate_name(adapter)
    except ConfigError as err:
        return [str(err)]
    if adapter in adapter_names(model):
        return [f"the model already has an adapter named {adapter!r}; load under another name "
                f"(name='...') or delete it first with loraplug.delete_adapter(model, "
                f"{adapter!r})."]
    return []


def _warn_before_loading(directory: Path, unknown: list[str], mismatched: list[str],
                         extras: FileExtras, plan: dict[str, _Planned]) -> None:
    if mismatched:
        warnings.warn(" ".join(mismatched), LoRAWarning, stacklevel=3)
    if unknown:
        warnings.warn(
            f"{directory / CONFIG_NAME} has fields loraplug does not know: {unknown}; they were "
            "ignored. If they change the adapter's math, outputs will differ from the writer's.",
            LoRAWarning, stacklevel=3,
        )
    if "loraplug" not in extras:
        _geometry_warning(plan)


def _geometry_warning(plan: dict[str, _Planned]) -> None:
    odd = [path for path, item in plan.items()
           if getattr(item.module, "padding_mode", "zeros") != "zeros"
           or any(d != 1 for d in getattr(item.module, "dilation", (1,)))]
    if odd:
        warnings.warn(
            f"the adapter file has no loraplug metadata (PEFT writes it so) and targets "
            f"convolutions with dilation or a non-zero padding_mode: {odd[:5]}. PEFT's A "
            "ignores both (peft#3697); loraplug applies them (so the adapter merges exactly), "
            "so outputs of those layers differ from PEFT's.",
            LoRAWarning, stacklevel=4,
        )


def load_adapter(
    model: nn.Module, path: str | Path, *, name: str | None = None, freeze_base: bool = True
) -> list[str]:
    """Load an adapter saved by :func:`save_adapter` or by PEFT into ``model``, in place.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or a legacy
    ``adapter_model.bin``, through ``torch.load(weights_only=True)`` only). The config
    is honoured as PEFT reads it: ``r``, ``lora_alpha``, ``use_rslora`` (scaling
    ``alpha / sqrt(r)``), ``rank_pattern`` and ``alpha_pattern`` (per-layer values),
    ``lora_dropout``, and ``target_modules`` / ``exclude_modules`` as a list (full name or
    ``.``-suffix) or a regex string (``re.fullmatch``). Keys may carry PEFT's
    ``base_model.model.`` prefix or not. The LoRA layers the adapter needs are injected
    (beside any existing adapters), then its tensors are copied in, converted to the
    base weight's dtype. The adapter becomes active only if the model had no adapter
    before; otherwise activate it with :func:`set_adapter`.

    Before changing anything, every key, shape and config field is checked; all
    problems are reported together and the model is left exactly as it was.

    Args:
        model: the base model the adapter was trained on (possibly with other adapters).
        path: the adapter directory, or its ``.safetensors``/``.bin`` file.
        name: the adapter's name in ``model``; ``None`` uses the name saved by
            :func:`save_adapter`, or ``"default"`` for files without one (PEFT's).
        freeze_base: set ``requires_grad=False`` on every non-LoRA parameter, as
            :func:`inject_lora` does.

    Returns:
        The sorted names of the layers that received the adapter.

    Raises:
        AdapterFileError: the directory or a file is missing, unreadable, truncated or
            not JSON; a ``.bin`` holds anything but tensors; keys are missing or
            unexpected; a key names a module the model lacks or of an unsupported type;
            shapes disagree with ``r``/``rank_pattern`` or with the layer; a config field
            cannot be honoured (``use_dora``, ``bias``, ``modules_to_save``, ...); the name
            is taken, or a target layer is merged; a config regex needs unbounded work; a
            shared module gets different tensors per path. One error lists every problem.
        ConfigError: ``path`` is not a path, or ``freeze_base`` not a bool.

    Warns:
        LoRAWarning: the config has fields loraplug does not know (ignored), a PEFT
            file targets dilated or non-zero-padded convolutions, whose adapter PEFT
            computes differently, or a rank exceeds the rank ΔW can have on a layer.
            Every warning comes before any change, so that with warnings as errors a
            warning leaves the model as it was.
    """
    directory, weights_file = locate(as_path(path, "load_adapter"))
    with locked([directory], shared=True):  # both files from one save (see _lock)
        raw = read_config(directory / CONFIG_NAME)
        state, metadata = read_adapter_weights(weights_file)
    config, config_problems, unknown = parse_config(raw)
    problems = [f"{CONFIG_NAME}: {p}" for p in config_problems]
    extras, found = read_metadata(metadata)
    problems += found
    adapter = name if name is not None else str(extras.get("adapter", "default"))
    problems += _name_problems(model, adapter)
    everything = {clean for clean, _, _ in candidates(model) if clean}
    entries, others, found = index_keys(state, everything)
    problems += found
    beside = TrainedExtras()
    if config is not None:
        beside, found = read_extras(model, config, state, others, adapter, sorted(entries))
        problems += found
    problems += other_key_problems(model, state, others)
    if not entries and not found:
        problems.append(f"{weights_file.name} holds no tensors.")
    plan: dict[str, _Planned] = {}
    if config is not None:
        try:  # config regexes: bounded work in all (see _regex); spectral_norm: reads
            with work_limit(), reading_weights(model.modules()):  # must not iterate
                plan, found = _plan(model, config, entries, extras, adapter)
        except RegexRefused as err:
            found = [f"{CONFIG_NAME}: the regex {err}; name the modules in a list instead."]
        problems += found
    if problems or config is None:
        raise AdapterFileError(report(f"cannot load the adapter in {directory}", problems))
    _warn_before_loading(directory, unknown, pair_problems(raw, metadata), extras, plan)
    with rng_untouched([item.module.owner if isinstance(item.module, ParameterTarget)
                        else item.module for item in plan.values()]):
        layers = inject_layers(
            model, {p: item.module for p, item in plan.items()},
            {p: item.spec for p, item in plan.items()}, name=adapter, init=config.init,
            use_rslora=config.use_rslora, freeze_base=freeze_base, options=config.options,
        )
    every = dict(lora_layers(model))
    with torch.no_grad():
        for layer_path, layer in layers.items():
            item = plan[layer_path]
            factor = part_factor(every, layer_path)
            layer.load_tensors(adapter, item.a, item.b if factor == 1.0 else item.b * factor)
            fill_variants(layer, adapter, item.extra)
    if beside.copies or beside.rows:
        fill_extras(model, beside, adapter, active=active_adapters(model),
                    disabled=any(m.adapters_disabled for m in layers.values()))
    return sorted(layers)


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], *, name: str = "default"
) -> list[str]:
    """Copy tensors from ``state`` into the existing adapter ``name``, in place.

    The counterpart of :func:`adapter_state_dict` (and of PEFT's
    ``set_peft_model_state_dict``): the adapter must already be on the model, injected
    with the hyperparameters it was trained with; this only replaces its A and B
    values. Keys may carry PEFT's ``base_model.model.`` prefix. Tensors are converted to
    the adapter's dtype and device.

    Every key, shape and dtype is checked first; on any problem nothing changes.

    Args:
        model: a model carrying adapter ``name``.
        state: ``key -> tensor`` as :func:`adapter_state_dict` returns it.
        name: the adapter to fill.

    Returns:
        The sorted names of the layers that were loaded.

    Raises:
        AdapterFileError: the model lacks adapter ``name``; ``state`` has missing or
            unexpected keys, wrong shapes or non-float values; or the adapter is merged
            (its weights would go stale): ``unmerge`` first. All problems are listed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> trained, fresh = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3))
        >>> for model in (trained, fresh):
        ...     _ = lp.inject_lora(model, target="0", rank=2)
        >>> _ = torch.nn.init.ones_(trained[0].lora_B["default"])
        >>> lp.load_adapter_state_dict(fresh, lp.adapter_state_dict(trained))
        ['0']
        >>> fresh[0].lora_B["default"].sum().item()
        6.0
    """
    where = f"load_adapter_state_dict(name={name!r})"
    if not isinstance(state, Mapping):
        raise AdapterFileError(
            f"{where}: state is a {type(state).__name__}; expected a mapping key -> tensor as "
            "loraplug.adapter_state_dict returns it."
        )
    carrying = [(path, layer) for path, layer in lora_layers(model) if name in layer.adapter_names]
    params = parameter_names(carrying, name)  # a parameter's tensors sit under PEFT's path
    layers = {params[path][0] if path in params else path: layer for path, layer in carrying}
    problems: list[str] = []
    if not layers:
        problems.append(
            f"the model has no adapter {name!r} (it has {adapter_names(model)}); inject it first "
            "with loraplug.inject_lora(..., name=...) using the rank and alpha it was trained "
            "with, or use loraplug.load_adapter for a saved directory."
        )
    everything = {clean for clean, _, _ in candidates(model) if clean}
    entries, others, found = index_keys(state, everything)
    extra_pairs, found_extras = state_extras(model, name, state, others)
    problems += found + found_extras + other_key_problems(model, state, others)
    loaded: dict[str, tuple[LoRALayer, Tensor, Tensor, dict[str, Tensor]]] = {}
    for path, slots, layer in _matched(entries, layers, problems,
                                       f"the model has no layer with adapter {name!r} there."):
        tensors, found = layer_tensors(path, type(layer), slots)
        extra, found_extra = extra_tensors(path, slots)
        problems += found + found_extra + adapter_variant_problems(path, layer, name, extra)
        if tensors is None:
            continue
        a, b = tensors
        want = (tuple(layer.lora_A[name].shape), tuple(layer.lora_B[name].shape))
        if (tuple(a.shape), tuple(b.shape)) != want:
            problems.append(
                f"{path}: shapes A {tuple(a.shape)}, B {tuple(b.shape)} in the state; adapter "
                f"{name!r} (rank {layer.rank[name]}) has A {want[0]}, B {want[1]}."
            )
        loaded[path] = (layer, a, b, extra)
    for path, layer in layers.items():
        if path not in entries:
            key_a, key_b = key_names(type(layer))
            problems.append(f"{path}: missing keys {path}.{key_a} and {path}.{key_b}.")
    merged = [path for path, layer in layers.items() if name in layer.merged_adapters]
    if merged:
        problems.append(
            f"adapter {name!r} is merged into {merged[:5]}; new values would leave those merged "
            "weights stale. Call loraplug.unmerge(model) first."
        )
    if problems:
        raise AdapterFileError(report(where, problems))
    every = dict(lora_layers(model))
    with torch.no_grad():
        for path, (layer, a, b, extra) in loaded.items():
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].copy_(b * part_factor(every, path))
            fill_variants(layer, name, extra)
        for target, value in extra_pairs:
            target.copy_(value)
    return sorted(loaded)
