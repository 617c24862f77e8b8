"""Adapter tensors under PEFT's key names: the file format's keys, export and in-memory load.

For a layer at module path ``<path>`` an adapter is two tensors, named as PEFT names them:
``<path>.lora_A.weight`` (r, in…) and ``<path>.lora_B.weight`` (out, r…), or
``<path>.lora_embedding_A`` (r, V) and ``<path>.lora_embedding_B`` (d, r) for embeddings.
Files written by PEFT's ``save_pretrained`` put ``base_model.model.`` before every key.
This module names, indexes and checks such keys; ``_load`` and ``_files`` read and write
the files around them.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._adapters import _check_names, adapter_names, lora_layers
from ._errors import AdapterFileError
from ._layer import LoRALayer
from ._targeting import candidates, clean_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
#: PEFT's ``save_pretrained`` puts this before every key (the ``PeftModel`` wrapper).
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = "1"

META_FORMAT = "loraplug.format"
META_VERSION = "loraplug.version"
META_ADAPTER = "loraplug.adapter"
META_DROPOUT = "loraplug.dropout"
#: The config fields that shape the adapter's math, as written beside the tensors, so that
#: a weights file and a config from different saves are caught on load.
META_CONFIG = "loraplug.config"
PAIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")

#: Key suffix -> (slot, key style); PEFT stores embedding adapters as bare parameters.
_SUFFIXES = {
    ".lora_A.weight": ("A", "weight"),
    ".lora_B.weight": ("B", "weight"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
_MAX_LINES = 40

Slots = dict[str, tuple[str, object, str]]  # slot -> (original key, value, key style)


def key_style(layer_cls: type[LoRALayer]) -> str:
    # PEFT names an embedding's adapter lora_embedding_A/B; every other layer lora_A/B.weight.
    return layer_cls.peft_key_style


def key_names(layer_cls: type[LoRALayer]) -> tuple[str, str]:
    if key_style(layer_cls) == "embedding":
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def report(where: str, problems: list[str]) -> str:
    shown = problems[:_MAX_LINES]
    lines = [f"{where}; nothing was changed:", *(f"  - {p}" for p in shown)]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" Close module names: {close}." if close else ""


def adapter_layers(model: nn.Module, name: str, action: str) -> list[tuple[str, LoRALayer]]:
    _check_names(model, [name], action)
    return [(path, layer) for path, layer in lora_layers(model) if name in layer.adapter_names]


# --------------------------------------------------------------------------- state dicts
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Return adapter ``name``'s tensors under PEFT's key names.

    Keys are ``<path>.lora_A.weight`` (shape ``(r, in…)``) and ``<path>.lora_B.weight``
    (``(out, r…)``) for Linear and convolution layers, ``<path>.lora_embedding_A``
    (``(r, V)``) and ``<path>.lora_embedding_B`` (``(d, r)``) for embeddings, where
    ``<path>`` is the layer's module name (without ``torch.compile``'s ``_orig_mod.``).
    These are the keys of PEFT's ``get_peft_model_state_dict`` on a model injected
    without a ``PeftModel`` wrapper. The tensors are detached and share storage with
    the parameters, as ``state_dict()`` does.

    Args:
        model: a model carrying adapter ``name``.
        name: the adapter to export.

    Returns:
        A dict ``key -> tensor``, two entries per layer.

    Raises:
        AdapterError: the model has no adapter ``name``.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Embedding(5, 4))
        >>> _ = lp.inject_lora(model, target=["0", "1"], rank=2)
        >>> {k: tuple(v.shape) for k, v in lp.adapter_state_dict(model).items()}
        {'0.lora_A.weight': (2, 4), '0.lora_B.weight': (3, 2),
         '1.lora_embedding_A': (2, 5), '1.lora_embedding_B': (4, 2)}
    """
    state: dict[str, Tensor] = {}
    for path, layer in adapter_layers(model, name, "adapter_state_dict"):
        key_a, key_b = key_names(type(layer))
        state[f"{path}.{key_a}"] = layer.lora_A[name].detach()
        state[f"{path}.{key_b}"] = layer.lora_B[name].detach()
    return state


def _hint(key: str) -> str:
    if key.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in key:
        return "a DoRA magnitude vector; DoRA is not supported yet"
    if ".lora_A." in key or ".lora_B." in key:
        return ("it names an adapter inside the key, as model.state_dict() does; export "
                "with loraplug.adapter_state_dict(model, name) instead")
    if ".modules_to_save." in key or key.endswith((".weight", ".bias")):
        return "a full module weight or bias, which a LoRA adapter does not carry"
    return "not a LoRA tensor (expected …lora_A.weight, …lora_B.weight, …lora_embedding_A/B)"


def index_keys(state: Mapping, names: set[str]) -> tuple[
        dict[str, Slots], dict[str, str], list[str]]:
    """Group LoRA keys by module path; keys may carry PEFT's ``base_model.model.``.

    Returns (path -> slots, other key without prefix -> original key, problems).
    """
    problems: list[str] = []
    keys = [k for k in state if isinstance(k, str)]
    problems += [f"key {k!r} is not a string" for k in state if not isinstance(k, str)]
    strip = bool(keys) and all(k.startswith(PEFT_PREFIX) for k in keys) \
        and "base_model.model" not in names
    entries: dict[str, Slots] = defaultdict(dict)
    others: dict[str, str] = {}
    for key in keys:
        short = key[len(PEFT_PREFIX):] if strip else key
        for suffix, (slot, style) in _SUFFIXES.items():
            if short.endswith(suffix) and len(short) > len(suffix):
                path = short[:-len(suffix)]
                if slot in entries[path]:
                    problems.append(
                        f"{path}: both {entries[path][slot][0]!r} and {key!r} give its lora_{slot}."
                    )
                entries[path][slot] = (key, state[key], style)
                break
        else:
            others[short] = key
    return dict(entries), others, problems


def other_key_problems(model: nn.Module, state: Mapping, others: dict[str, str]) -> list[str]:
    """Problems with keys that are not LoRA tensors.

    PEFT also saves the base weights of targeted (or resized) embedding layers, as
    ``<path>.base_layer.weight``. Such a key is accepted when it equals the model's own
    tensor, since loading it would change nothing; any other key is a problem.
    """
    if not others:
        return []
    model_tensors = {clean_name(k): v for k, v in model.state_dict().items()}
    problems: list[str] = []
    for short, key in others.items():
        own = short.replace(".base_layer.", ".") if ".base_layer." in short else short
        mine, theirs = model_tensors.get(own), state[key]
        if mine is None or not isinstance(theirs, Tensor):
            problems.append(f"unexpected key {key!r}: {_hint(short)}.")
        elif theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine.cpu()):
            problems.append(
                f"{key!r} holds a base weight for {own} (PEFT saves embedding layers that are "
                f"targeted or resized) with shape {tuple(theirs.shape)}, and it differs from the "
                f"model's {own} {tuple(mine.shape)}: the adapter was trained on other base "
                f"weights. Load them first, e.g. model.load_state_dict({{{own!r}: tensor}}, "
                "strict=False), then the adapter."
            )
    return problems


def layer_tensors(path: str, layer_cls: type[LoRALayer], slots: Slots) -> tuple[
        tuple[Tensor, Tensor] | None, list[str]]:
    """The (A, B) tensors of one layer, or the reasons they are unusable."""
    problems: list[str] = []
    style = key_style(layer_cls)
    names = dict(zip("AB", key_names(layer_cls)))
    found: dict[str, Tensor] = {}
    for slot in "AB":
        if slot not in slots:
            problems.append(f"{path}: missing key {path}.{names[slot]}.")
            continue
        key, value, found_style = slots[slot]
        if found_style != style:
            problems.append(
                f"{path}: key {key!r} is the wrong kind for a {layer_cls.__name__}, whose "
                f"tensors are named {path}.{names['A']} and {path}.{names['B']} (PEFT's names)."
            )
        elif not isinstance(value, Tensor):
            problems.append(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor.")
        elif not value.is_floating_point():
            problems.append(f"{path}: {key!r} has dtype {value.dtype}; expected a float tensor.")
        else:
            found[slot] = value
    if problems:
        return None, problems
    return (found["A"], found["B"]), []


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
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> state = {k: torch.ones_like(v) for k, v in lp.adapter_state_dict(model).items()}
        >>> lp.load_adapter_state_dict(model, state)
        ['0']
        >>> model[0].lora_B["default"].sum().item()
        6.0
    """
    where = f"load_adapter_state_dict(name={name!r})"
    if not isinstance(state, Mapping):
        raise AdapterFileError(
            f"{where}: state is a {type(state).__name__}; expected a mapping key -> tensor as "
            "loraplug.adapter_state_dict returns it."
        )
    layers = {path: layer for path, layer in lora_layers(model) if name in layer.adapter_names}
    problems: list[str] = []
    if not layers:
        problems.append(
            f"the model has no adapter {name!r} (it has {adapter_names(model)}); inject it first "
            "with loraplug.inject_lora(..., name=...) using the rank and alpha it was trained "
            "with, or use loraplug.load_adapter for a saved directory."
        )
    everything = {clean for clean, _, _ in candidates(model) if clean}
    entries, others, found = index_keys(state, everything)
    problems += found + other_key_problems(model, state, others)
    loaded: dict[str, tuple[LoRALayer, Tensor, Tensor]] = {}
    for path, slots in sorted(entries.items()):
        layer = layers.get(path)
        if layer is None:
            problems.append(f"{path}: the model has no layer with adapter {name!r} there."
                            + close_names(path, sorted(layers)))
            continue
        tensors, found = layer_tensors(path, type(layer), slots)
        problems += found
        if tensors is None:
            continue
        a, b = tensors
        want = (tuple(layer.lora_A[name].shape), tuple(layer.lora_B[name].shape))
        if (tuple(a.shape), tuple(b.shape)) != want:
            problems.append(
                f"{path}: shapes A {tuple(a.shape)}, B {tuple(b.shape)} in the state; adapter "
                f"{name!r} (rank {layer.rank[name]}) has A {want[0]}, B {want[1]}."
            )
        loaded[path] = (layer, a, b)
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
    with torch.no_grad():
        for layer, a, b in loaded.values():
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].copy_(b)
    return sorted(loaded)
