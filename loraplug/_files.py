"""Adapter files: save and load adapters in PEFT's layout, and save merged checkpoints.

An adapter directory holds two files, exactly as PEFT writes them:

- ``adapter_config.json``: ``peft_type``, ``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ... (see ``_peft_config``);
- ``adapter_model.safetensors``: for each layer at ``<path>``, the tensors
  ``base_model.model.<path>.lora_A.weight`` (r, in…) and ``….lora_B.weight`` (out, r…),
  or ``….lora_embedding_A`` (r, V) and ``….lora_embedding_B`` (d, r) for embeddings.
  What PEFT has no field for (the adapter's name, per-layer dropout, the loraplug
  version) is kept in the safetensors metadata under ``loraplug.*``.

Loading reads PEFT's files and ours alike, checks every key, shape and config field
against the model, and reports every problem in one :class:`AdapterFileError` before
anything changes. Nothing is ever unpickled: ``.bin`` files go through
``torch.load(weights_only=True)``.

This module saves; the rest of persistence lives beside it: ``_adapter_state`` (key
names, ``adapter_state_dict``, ``load_adapter_state_dict``), ``_load`` (reading
directories, ``load_adapter``), ``_peft_config`` (the config, PEFT's rules) and
``_atomic`` (atomic writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from safetensors.torch import save_file
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
    PEFT_PREFIX,
    WEIGHTS_NAME,
    adapter_layers,
    adapter_state_dict,
    load_adapter_state_dict,
)
from ._adapters import check_mergeable, lora_layers
from ._atomic import bytes_writer, write_atomically
from ._distributed import gather_full, run_on_main
from ._errors import AdapterFileError
from ._inject import _module_paths
from ._load import load_adapter
from ._peft_config import build_config
from ._targeting import candidates, clean_name

__all__ = ["adapter_state_dict", "load_adapter", "load_adapter_state_dict", "save_adapter",
           "save_merged"]


def _write(files: dict[Path, object], action: str) -> None:
    try:
        write_atomically(files)  # type: ignore[arg-type]
    except OSError as err:
        raise AdapterFileError(
            f"{action} could not write {', '.join(str(p) for p in files)}: {err}. Each file is "
            "either the old or the new one, never a partial write; if only some were replaced, "
            "load_adapter detects the mismatched pair and refuses it. Save again."
        ) from err


def save_adapter(model: nn.Module, path: str | Path, *, name: str = "default") -> None:
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
    layers = adapter_layers(model, name, "save_adapter")
    rslora = {layer.use_rslora[name] for _, layer in layers}
    if len(rslora) > 1:
        mixed = sorted(path for path, layer in layers if layer.use_rslora[name])
        raise AdapterFileError(
            f"save_adapter: adapter {name!r} uses rsLoRA on {mixed[:5]} but not on its other "
            "layers; PEFT's config has one use_rslora per adapter. Save the two groups as "
            "separate adapters."
        )
    specs = {path: (layer.rank[name], layer.alpha[name], layer.dropout[name])
             for path, layer in layers}
    all_names = [clean for clean, _, _ in candidates(model) if clean]
    config = build_config(specs, use_rslora=rslora.pop(), all_names=all_names,
                          fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False)
                                             for _, layer in layers))
    tensors = {PEFT_PREFIX + key: gather_full(value).to("cpu").contiguous()
               for key, value in adapter_state_dict(model, name).items()}
    from . import __version__

    metadata = {"format": "pt", META_FORMAT: FORMAT_VERSION, META_VERSION: __version__,
                META_ADAPTER: name}
    metadata[META_CONFIG] = json.dumps({k: config.get(k) for k in PAIRED_FIELDS}, sort_keys=True)
    if len({dropout for _, _, dropout in specs.values()}) > 1:
        metadata[META_DROPOUT] = json.dumps({p: s[2] for p, s in sorted(specs.items())})
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    directory = Path(path)

    def write() -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AdapterFileError(
                f"save_adapter: cannot create directory {directory}: {err}. Pass a directory "
                "path."
            ) from err
        # An adapter is small: serialise it in memory, then write it through our own file.
        _write({
            directory / WEIGHTS_NAME: bytes_writer(serialize(tensors, metadata=metadata)),
            directory / CONFIG_NAME: bytes_writer(config_bytes),
        }, "save_adapter")

    run_on_main(model, write)  # FSDP2: process 0 writes, the others wait for it


def save_merged(model: nn.Module, path: str | Path) -> None:
    """Write the model's weights with its adapters merged in, under the base model's keys.

    The file is a plain safetensors state dict of the original architecture: each LoRA
    layer's ``weight`` is ``W + Σ_a s_a ΔW_a`` over its active adapters (ΔW summed in
    float32 for half-precision weights, then cast), the ``lora_A``/``lora_B`` keys are
    left out, and ``torch.compile``'s ``_orig_mod.`` is removed from key names, so
    ``original_model.load_state_dict(safetensors.torch.load_file(path))`` works without
    loraplug. The model itself is not changed: merged weights are computed beside it
    (one extra copy of the adapted weights is held while writing). An already merged
    layer is written as it is. The write is atomic.

    Args:
        model: a model with LoRA layers (a plain model is written as it is).
        path: the ``.safetensors`` file to write.

    Raises:
        StateError: adapters are disabled (inside ``disable_adapters``), or the model is
            sharded by FSDP2 (merge on one process).
        AdapterFileError: the file cannot be written.

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
    check_mergeable(model, layers, "save_merged")
    paths = _module_paths(model)
    state = model.state_dict()
    with torch.no_grad():
        for _, layer in layers:
            weight = layer.weight.detach() if layer.merged else layer.merged_weight()
            for real in paths[id(layer)]:
                prefix = f"{real}." if real else ""
                for adapter in layer.adapter_names:
                    state.pop(f"{prefix}lora_A.{adapter}", None)
                    state.pop(f"{prefix}lora_B.{adapter}", None)
                state[f"{prefix}weight"] = weight
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = value.detach().to("cpu")
        pointer = value.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights): write copies.
        value = value.clone() if pointer in storages else value.contiguous()
        storages.add(pointer)
        tensors[clean_name(key)] = value
    target = Path(path)
    _write({target: lambda temp: save_file(tensors, temp, metadata={"format": "pt"})},
           "save_merged")
