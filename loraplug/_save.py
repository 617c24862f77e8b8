"""Saving: adapters in PEFT's layout (with their state dict), and merged checkpoints.

``save_adapter`` writes the two files of an adapter directory (see ``_format``) so that
PEFT and :func:`load_adapter` read them; ``adapter_state_dict`` is the same tensors in
memory. ``save_merged`` writes a plain state dict of the original architecture. Every
write is atomic (``_atomic``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from safetensors.torch import save_file
from torch import Tensor, nn

from ._adapters import check_mergeable, check_names, lora_layers
from ._atomic import bytes_writer, write_atomically
from ._distributed import gather_full, run_on_main
from ._errors import AdapterFileError, LoRAWarning
from ._extras_files import extras_config, extras_state, merged_extras_state
from ._format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    META_ADAPTER,
    META_CONFIG,
    META_DROPOUT,
    META_FORMAT,
    META_VERSION,
    PAIRED_FIELDS,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    key_names,
    key_path,
    part_factor,
)
from ._inits import rewrites_base
from ._layer import LoRALayer
from ._parameter_targeting import parameter_names
from ._paths import as_path
from ._peft_config import build_config
from ._products import compute_dtype
from ._quantized import plain_state
from ._save_fields import as_plain, uniform_fields
from ._targeting import candidates, clean_name, module_paths
from ._variant_files import variant_state
from ._variants import ADAPTER_REGISTRIES, adapted_bias
from ._version import VERSION


def _adapter_layers(model: nn.Module, name: str, action: str) -> list[tuple[str, LoRALayer]]:
    check_names(model, [name], action)
    return [(path, layer) for path, layer in lora_layers(model) if name in layer.adapter_names]


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Return adapter ``name``'s tensors under PEFT's key names.

    Keys are ``<path>.lora_A.weight`` (shape ``(r, in…)``) and ``<path>.lora_B.weight``
    (``(out, r…)``) for Linear and convolution layers, ``<path>.lora_embedding_A``
    (``(r, V)``) and ``<path>.lora_embedding_B`` (``(d, r)``) for embeddings, where
    ``<path>`` is the layer's module name (without ``torch.compile``'s ``_orig_mod.``).
    A bare parameter's adapter is keyed by its module's name, with PEFT's
    ``base_layer.`` nesting when several parameters of one module carry it (see
    :class:`LoRAParameter`).
    These are the keys of PEFT's ``get_peft_model_state_dict`` on a model injected
    without a ``PeftModel`` wrapper. The tensors are detached and share storage with
    the parameters, as ``state_dict()`` does, except B of an attention's ``out_proj``
    (key ``<attention>.base_layer.out_proj...``), which is halved: PEFT applies that one
    twice (see :class:`loraplug.LoRAMultiheadAttention`).

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
    every = dict(lora_layers(model))
    layers = _adapter_layers(model, name, "adapter_state_dict")
    params = parameter_names(layers, name)  # a parameter's tensors sit under PEFT's path
    for path, layer in layers:
        key_a, key_b = key_names(type(layer))
        factor = part_factor(every, path)
        b = layer.lora_B[name].detach()
        where = params[path][0] if path in params else key_path(path, set(every))
        state[f"{where}.{key_a}"] = layer.lora_A[name].detach()
        state[f"{where}.{key_b}"] = b if factor == 1.0 else b / factor
        state.update(variant_state(layer, where, name))
    state.update(extras_state(model, name))
    return state


def _write(files: dict[Path, Callable[[str], None]], action: str) -> None:
    try:
        write_atomically(files)
    except OSError as err:
        raise AdapterFileError(
            f"{action} could not write {', '.join(str(p) for p in files)}: {err}. Each file is "
            "either the old or the new one, never a partial write; if only some were replaced, "
            "load_adapter warns that the config and the weights come from different saves (and "
            "refuses them if their shapes disagree). Save again."
        ) from err


def save_adapter(model: nn.Module, path: str | Path, *, name: str = "default",
                 plain: bool = False) -> None:
    """Save adapter ``name`` to directory ``path`` in PEFT's layout; PEFT can load it.

    Writes ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
    ``target_modules`` = the adapted layers' names, ``rank_pattern`` /
    ``alpha_pattern`` for layers whose rank or alpha differ from the most common one,
    ``use_rslora``, ``lora_dropout``, ``bias: "none"``, ...) and
    ``adapter_model.safetensors`` with the keys of :func:`adapter_state_dict` prefixed
    by ``base_model.model.`` (as PEFT's ``save_pretrained`` writes them), contiguous, in
    the adapter's dtype. The adapter's name, per-layer dropout and the loraplug version
    go into the safetensors metadata. The directory is created if needed.

    Each file is written to a temporary file in ``path``, synced, and renamed over the
    old one only once both are complete, so an interrupted save leaves a previous
    adapter in ``path`` intact. On a model sharded with FSDP2, call it on every process:
    the adapter's shards are gathered whole and process 0 alone writes.

    Args:
        model: a model carrying adapter ``name`` (merged or not: A and B are saved).
        path: the directory to write.
        name: the adapter to save.

    Raises:
        AdapterError: the model has no adapter ``name``.
        AdapterFileError: the adapter uses rsLoRA on some layers only (PEFT's config has
            one ``use_rslora``), or the files cannot be written.
        ConfigError: ``path`` is not a path.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     lp.save_adapter(model, tmp)
        ...     fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        ...     lp.load_adapter(fresh, tmp)
        ['0']
    """
    if not isinstance(plain, bool):
        raise AdapterFileError(f"save_adapter: plain must be True or False; received {plain!r}.")
    layers = _adapter_layers(model, name, "save_adapter")
    fields = uniform_fields(layers, name)
    params = parameter_names(layers, name)
    specs = {params[path][1] if path in params else path:
             (layer.rank[name], layer.alpha[name], layer.dropout[name]) for path, layer in layers}
    state = adapter_state_dict(model, name)
    if plain and rewrites_base(str(fields["init_lora_weights"])):
        specs, state = as_plain(layers, name, specs, state)
        fields["init_lora_weights"] = True
    all_names = [clean for clean, _, _ in candidates(model) if clean]
    # A part whose owner carries the adapter too is implied by the owner's name (PEFT
    # adapts an attention's out_proj with it).
    modules = {path for path, _ in layers if path not in params}
    implied = {path for path in modules if path.rpartition(".")[0] in modules}
    config = build_config(specs, use_rslora=bool(fields.pop("use_rslora")), all_names=all_names,
                          fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False)
                                             for _, layer in layers), implied=implied,
                          parameters={full for _, full in params.values()})
    config.update(fields, **extras_config(model, name))
    beyond = sorted(path for path, layer in layers if path in params and layer.weight.dim() > 3)
    if beyond:
        warnings.warn(
            f"save_adapter: {[params[p][1] for p in beyond]} have more than 3 dimensions; "
            "PEFT's target_parameters takes 2 or 3, so PEFT will not load this adapter "
            "(loraplug will).", LoRAWarning, stacklevel=2)
    tensors = {PEFT_PREFIX + key: gather_full(value).to("cpu").contiguous()
               for key, value in state.items()}
    metadata = {"format": "pt", META_FORMAT: FORMAT_VERSION, META_VERSION: VERSION,
                META_ADAPTER: name}
    metadata[META_CONFIG] = json.dumps({k: config.get(k) for k in PAIRED_FIELDS}, sort_keys=True)
    if any(dropout != config["lora_dropout"] for _, _, dropout in specs.values()):
        metadata[META_DROPOUT] = json.dumps({p: s[2] for p, s in sorted(specs.items())})
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    directory = as_path(path, "save_adapter")

    def write() -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AdapterFileError(
                f"save_adapter: cannot create directory {directory}: {err}. Pass a directory "
                "path."
            ) from err
        # An adapter is small: serialise it in memory, then write it through our own file.
        weights = _canonical(serialize(tensors, metadata=metadata))
        _write({
            directory / WEIGHTS_NAME: bytes_writer(weights),
            directory / CONFIG_NAME: bytes_writer(config_bytes),
        }, "save_adapter")

    run_on_main(model, write)  # FSDP2: process 0 writes, the others wait for it


def _canonical(data: bytes) -> bytes:
    """The safetensors bytes with their JSON header's keys sorted, so that saving the same
    adapter twice gives the same bytes (the writer orders metadata by hash)."""
    # Layout: an 8-byte little-endian header length, the JSON header padded with spaces to
    # a multiple of 8, then the tensor data, whose offsets the reordering leaves alone.
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]



def _merge_into(state: dict[str, Tensor], stored: dict[str, Tensor], tensor: Tensor,
                merged: Tensor) -> None:
    """Write ``merged``, the new value of ``tensor``, into the state entries that hold it.

    ``tensor`` is a model tensor that is not a LoRA layer's own ``weight``: a bare
    parameter of its host, or rows of an attention's ``in_proj_weight`` (a view). The
    entries are found by storage; a view's rows are written into a copy of the whole
    tensor, and several layers writing one tensor (an attention's in_proj adapter and
    its q part) add their updates.
    """
    pointer = tensor.untyped_storage().data_ptr()
    for key, held in state.items():
        if held.untyped_storage().data_ptr() != pointer or not held.is_floating_point():
            continue
        offset = tensor.storage_offset() - held.storage_offset()
        last = offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
        if not held.is_contiguous() or offset < 0 or last >= held.numel():
            continue  # another tensor in the same storage (a flat buffer of parameters)
        whole = (held.shape, held.stride(), offset) == (tensor.shape, tensor.stride(), 0)
        if whole and key not in stored:
            stored[key] = merged
            continue
        target = stored.setdefault(key, held.detach().clone(memory_format=torch.preserve_format))
        region = target.as_strided(tensor.shape, tensor.stride(),
                                   target.storage_offset() + offset)
        dtype = compute_dtype(region.dtype)
        region.copy_((region.to(dtype) + merged.to(dtype) - tensor.to(dtype)).to(region.dtype))

def save_merged(model: nn.Module, path: str | Path) -> None:
    """Write the model's weights with its adapters merged in, under the base model's keys.

    The file is a plain safetensors state dict of the original architecture: each LoRA
    layer's ``weight`` is ``W + Σ_a s_a ΔW_a`` over its active adapters (ΔW summed in
    float32 for half-precision weights, then cast), the ``lora_A``/``lora_B`` keys are
    left out, and ``torch.compile``'s ``_orig_mod.`` is removed from key names, so
    ``original_model.load_state_dict(safetensors.torch.load_file(path))`` works without
    loraplug. Quantized weights (bitsandbytes, torchao) are written dequantized, in full
    precision, without their quantization statistics: ``dequantize(W) + ΔW`` for LoRA
    layers, ``dequantize(W)`` for the others, so the architecture built with plain
    ``nn.Linear`` layers loads the file. The model itself is not changed: merged weights
    are computed beside it
    (one extra copy of the adapted weights is held while writing). An already merged
    layer is written as it is. The write is atomic.

    Args:
        model: a model with LoRA layers (a plain model is written as it is).
        path: the ``.safetensors`` file to write.

    Raises:
        StateError: adapters are disabled (inside ``disable_adapters``), the model is
            sharded by FSDP2 (merge on one process), or a weight is tied, parametrized or
            computed by a hook.
        AdapterFileError: the file cannot be written.
        ConfigError: ``path`` is not a path.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> from safetensors.torch import load_file
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     lp.save_merged(model, os.path.join(tmp, "merged.safetensors"))
        ...     sorted(load_file(os.path.join(tmp, "merged.safetensors")))
        ['0.bias', '0.weight']
    """
    layers = lora_layers(model)
    check_mergeable(model, layers, "save_merged", to_file=True)
    paths = module_paths(model)
    state = model.state_dict()
    stored: dict[str, Tensor] = {}  # merged tensors written through views, by key
    with torch.no_grad():
        for _, layer in layers:
            # The weight holds the merged adapters; the active ones not merged are added.
            weight = layer.merged_weight(layer._live) if layer._live else layer.weight.detach()
            bias: Tensor | None = layer._parameters.get("bias")
            if layer._live and layer._extended:  # merged ones are in the bias already
                bias = adapted_bias(layer, layer._live, layer.scaling)
            for real in paths[id(layer)]:
                prefix = f"{real}." if real else ""
                for key in [k for k in state if k.startswith(prefix)
                            and k[len(prefix):].split(".")[0] in ADAPTER_REGISTRIES]:
                    del state[key]
                if "weight" in layer._parameters:
                    state[f"{prefix}weight"] = weight
                if bias is not None:
                    state[f"{prefix}bias"] = bias.detach()
            if layer._live and "weight" not in layer._parameters:
                # Another module's tensor (a bare parameter's) or a view of one (q, k, v).
                _merge_into(state, stored, layer._tensor("weight"), weight)
        state.update(stored)
        merged_extras_state(model, state)
    state = plain_state(model, state)  # quantized weights dequantized, their statistics dropped
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = value.detach().to("cpu")
        pointer = value.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights): write copies.
        value = value.clone() if pointer in storages else value.contiguous()
        storages.add(pointer)
        tensors[clean_name(key)] = value
    target = as_path(path, "save_merged")
    _write({target: lambda temp: save_file(tensors, temp, metadata={"format": "pt"})},
           "save_merged")
