"""Reading adapter directories, ours and PEFT's: every check first, then one change.

``load_adapter`` reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``, through ``torch.load(weights_only=True)`` only: nothing is
ever unpickled), checks every key, shape and config field against the model, and reports
every problem in one :class:`AdapterFileError` before anything changes.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import safetensors
import torch
from torch import Tensor, nn

from ._adapter_state import (
    CONFIG_NAME,
    FORMAT_VERSION,
    META_ADAPTER,
    META_CONFIG,
    META_DROPOUT,
    META_FORMAT,
    META_VERSION,
    PAIRED_FIELDS,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Slots,
    close_names,
    index_keys,
    key_names,
    layer_tensors,
    other_key_problems,
    report,
)
from ._adapters import adapter_names
from ._config import validate_hyperparameters
from ._errors import AdapterFileError, LoRAError, LoRAWarning, StateError
from ._inject import LayerSpec, _module_paths, _problems, inject_layers
from ._layer import LoRALayer
from ._peft_config import PeftLoRAConfig, parse_config
from ._registry import lookup, supported_types, type_name
from ._targeting import candidates


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        for weights_name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            if (path / weights_name).is_file():
                directory, weights = path, path / weights_name
                break
        else:
            raise AdapterFileError(
                f"{path} has neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME}; expected a "
                "directory written by loraplug.save_adapter or PEFT's save_pretrained."
            )
    elif path.is_file() and path.suffix in (".safetensors", ".bin"):
        directory, weights = path.parent, path
    else:
        raise AdapterFileError(
            f"{path} is not an adapter directory (or a .safetensors/.bin file inside one); "
            "pass the directory written by loraplug.save_adapter or PEFT's save_pretrained."
        )
    if not (directory / CONFIG_NAME).is_file():
        raise AdapterFileError(
            f"{directory} has no {CONFIG_NAME}; an adapter directory needs the config beside "
            "its weights (loraplug.save_adapter and PEFT's save_pretrained write both)."
        )
    return directory, weights


def _read_config(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFileError(
            f"{path} is not valid JSON ({err}); it should hold PEFT's LoRA config. Save the "
            "adapter again, or repair the file."
        ) from err


def _read_weights(path: Path) -> tuple[Mapping, dict[str, str]]:
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except (safetensors.SafetensorError, OSError) as err:
            raise AdapterFileError(
                f"{path} is not a readable safetensors file ({err}); it may be truncated or "
                "corrupt. Save the adapter again."
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise AdapterFileError(
            f"refused to load {path}: PyTorch's tensor-only unpickler rejected it"
            f"{' (' + detail + ')' if detail else ''}. A pickle holding anything but tensors "
            "can run arbitrary code when loaded, so it was not unpickled. If you trust the "
            "file, convert it to safetensors yourself."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a readable torch file ({err}).") from err
    if not isinstance(state, Mapping):
        raise AdapterFileError(
            f"{path} holds a {type(state).__name__}; expected a dict key -> tensor."
        )
    return state, {}


def _read_metadata(metadata: dict[str, str]) -> tuple[dict[str, object], list[str]]:
    extras: dict[str, object] = {}
    problems: list[str] = []
    if META_FORMAT not in metadata:
        return extras, problems
    extras["loraplug"] = True
    if metadata[META_FORMAT] != FORMAT_VERSION:
        problems.append(
            f"the weights were written in loraplug file format {metadata[META_FORMAT]!r} "
            f"(loraplug {metadata.get(META_VERSION, '?')}); this version reads format "
            f"{FORMAT_VERSION!r}. Upgrade loraplug."
        )
    if META_ADAPTER in metadata:
        extras["adapter"] = metadata[META_ADAPTER]
    if META_DROPOUT in metadata:
        try:
            dropout = json.loads(metadata[META_DROPOUT])
            ok = isinstance(dropout, dict) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                for v in dropout.values())
        except ValueError:
            ok = False
        if ok:
            extras["dropout"] = dropout
        else:
            problems.append(
                f"metadata {META_DROPOUT} is {metadata[META_DROPOUT]!r}; expected a JSON "
                "object of dropout probabilities in [0, 1)."
            )
    return extras, problems


def _pair_problems(raw: object, metadata: dict[str, str]) -> list[str]:
    """Config fields that disagree with those saved beside the tensors.

    Either the save was interrupted between its two renames, or the config was edited
    by hand (which may be deliberate: a warning, not an error).
    """
    if META_CONFIG not in metadata or not isinstance(raw, dict):
        return []
    try:
        saved = json.loads(metadata[META_CONFIG])
    except ValueError:
        return [f"metadata {META_CONFIG} is not JSON; save the adapter again."]
    differ = [k for k in PAIRED_FIELDS if isinstance(saved, dict) and saved.get(k) != raw.get(k)]
    if not differ:
        return []
    details = ", ".join(
        f"{k} is {raw.get(k)!r} in the config but was {saved.get(k)!r} when the weights were "
        "written" for k in differ
    )
    return [
        f"{CONFIG_NAME} and the weights come from different saves (an interrupted save, or an "
        f"edited config): {details}. The config was used; if it was not edited on purpose, "
        "save the adapter again."
    ]


# --------------------------------------------------------------------------- load_adapter
def _expected_shape_problem(path: str, probe: LoRALayer, got: tuple[Tensor, Tensor],
                            rank: int, source: str) -> str | None:
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


def _geometry_warning(plan: dict[str, tuple]) -> None:  # type: ignore[type-arg]
    odd = [path for path, (module, *_rest) in plan.items()
           if getattr(module, "padding_mode", "zeros") != "zeros"
           or any(d != 1 for d in getattr(module, "dilation", (1,)))]
    if odd:
        warnings.warn(
            f"the adapter file has no loraplug metadata (PEFT writes it so) and targets "
            f"convolutions with dilation or a non-zero padding_mode: {odd[:5]}. PEFT's A "
            "ignores both (peft#3697); loraplug applies them (so the adapter merges exactly), "
            "so outputs of those layers differ from PEFT's.",
            LoRAWarning, stacklevel=3,
        )


@contextlib.contextmanager
def _rng_untouched(modules: list[nn.Module]) -> Iterator[None]:
    # Injection draws initial values that the file then overwrites; keep the caller's RNG.
    devices = {t.device for m in modules for t in m.parameters(recurse=False)
               if t.device.type != "cpu"}
    kinds = {d.type for d in devices}
    if len(kinds) == 1:
        with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}),
                                   device_type=kinds.pop()):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


def _plan(model: nn.Module, config: PeftLoRAConfig, entries: dict[str, Slots],
          extras: dict[str, object], adapter: str) -> tuple[dict[str, tuple], list[str]]:  # type: ignore[type-arg]
    everything = {clean: module for clean, _, module in candidates(model) if clean}
    names = sorted(everything)
    paths = _module_paths(model)
    dropouts = extras.get("dropout", {})
    problems: list[str] = []
    plan: dict[str, tuple] = {}  # type: ignore[type-arg]
    for path, slots in sorted(entries.items()):
        module = everything.get(path)
        if module is None:
            problems.append(
                f"{path}: the model has no module of that name.{close_names(path, names)}")
            continue
        if isinstance(module, LoRALayer):
            layer_cls, probe = type(module), module
        else:
            found = lookup(type(module))
            if found is None:
                problems.append(
                    f"{path} is a {type_name(type(module))}, which has no LoRA layer; supported: "
                    f"{supported_types()} and their subclasses."
                )
                continue
            layer_cls, probe = found[0], None
        if not config.targets(path):
            problems.append(
                f"{path}: the file has tensors for it, but target_modules / exclude_modules in "
                f"{CONFIG_NAME} do not select it."
            )
        rank, alpha, source = config.spec(path)
        dropout = float(dropouts.get(path, config.dropout))  # type: ignore[attr-defined]
        blockers = _problems(model, path, module, paths[id(module)], rank=rank,
                             dropout=dropout, adapter=adapter)
        problems += [message for _, message in blockers]
        tensors, found_problems = layer_tensors(path, layer_cls, slots)
        problems += found_problems
        if tensors is None or any(kind is StateError for kind, _ in blockers):
            continue
        if probe is None:
            probe = layer_cls(module, lookup(type(module))[1])  # type: ignore[index]
        shape_problem = _expected_shape_problem(path, probe, tensors, rank, source)
        if shape_problem:
            problems.append(shape_problem)
        plan[path] = (module, LayerSpec(rank, alpha), dropout, *tensors)
    if config.names_explicitly():
        for path, module in everything.items():
            if path in entries or not config.targets(path):
                continue
            layer_cls = type(module) if isinstance(module, LoRALayer) else \
                (lookup(type(module)) or (None,))[0]
            if layer_cls is not None:
                key_a, key_b = key_names(layer_cls)
                problems.append(
                    f"{path}: target_modules selects it, but the file lacks "
                    f"{path}.{key_a} and {path}.{key_b}."
                )
    return plan, problems


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
            is taken, or a target layer is merged. One error lists every problem.

    Warns:
        LoRAWarning: the config has fields loraplug does not know (ignored), or a PEFT
            file targets dilated or non-zero-padded convolutions, whose adapter PEFT
            computes differently.
    """
    directory, weights_file = _locate(Path(path))
    where = f"cannot load the adapter in {directory}"
    raw = _read_config(directory / CONFIG_NAME)
    state, metadata = _read_weights(weights_file)
    config, config_problems, unknown = parse_config(raw)
    problems = [f"{CONFIG_NAME}: {p}" for p in config_problems]
    extras, found = _read_metadata(metadata)
    problems += found
    mismatched = _pair_problems(raw, metadata)
    adapter = name if name is not None else str(extras.get("adapter", "default"))
    try:
        validate_hyperparameters(rank=1, alpha=1.0, dropout=0.0, name=adapter, init="kaiming")
    except LoRAError as err:
        problems.append(str(err))
    if adapter in adapter_names(model):
        problems.append(
            f"the model already has an adapter named {adapter!r}; load under another name "
            f"(name='...') or delete it first with loraplug.delete_adapter(model, {adapter!r})."
        )
    everything = {clean for clean, _, _ in candidates(model) if clean}
    entries, others, found = index_keys(state, everything)
    problems += found + other_key_problems(model, state, others)
    if not entries and not found:
        problems.append(f"{weights_file.name} holds no tensors.")
    plan: dict[str, tuple] = {}  # type: ignore[type-arg]
    if config is not None:
        plan, found = _plan(model, config, entries, extras, adapter)
        problems += found
    if problems or config is None:
        raise AdapterFileError(report(where, problems))
    if mismatched:
        warnings.warn(" ".join(mismatched), LoRAWarning, stacklevel=2)
    if unknown:
        warnings.warn(
            f"{directory / CONFIG_NAME} has fields loraplug does not know: {unknown}; they were "
            "ignored. If they change the adapter's math, outputs will differ from the writer's.",
            LoRAWarning, stacklevel=2,
        )
    if "loraplug" not in extras:
        _geometry_warning(plan)

    by_dropout: dict[float, dict[str, nn.Module]] = defaultdict(dict)
    for layer_path, (module, _, dropout, _a, _b) in plan.items():
        by_dropout[dropout][layer_path] = module
    specs = {layer_path: spec for layer_path, (_, spec, *_rest) in plan.items()}
    layers: dict[str, LoRALayer] = {}
    with _rng_untouched([module for module, *_rest in plan.values()]):
        for dropout, modules in sorted(by_dropout.items()):
            layers.update(inject_layers(
                model, modules, specs, name=adapter, dropout=dropout, init="kaiming",
                use_rslora=config.use_rslora, freeze_base=freeze_base,
            ))
    with torch.no_grad():
        for layer_path, layer in layers.items():
            *_rest, a, b = plan[layer_path]
            layer.lora_A[adapter].copy_(a)
            layer.lora_B[adapter].copy_(b)
    return sorted(layers)
