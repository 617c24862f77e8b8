"""``loraplug inspect``: an adapter directory's layers, ranks, sizes and finiteness."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The readers load_adapter uses, so that inspect sees a file exactly as loading does.
from .._format import (
    CONFIG_NAME,
    index_keys,
    locate,
    read_adapter_weights,
    read_config,
    read_metadata,
)
from .._peft_config import parse_config
from ._common import byte_size, dims, one_line, table


def _print_header(directory: Path, weights_file: Path, raw: object, extras: Mapping[str, Any],
                  metadata: Mapping[str, str], unknown: list[str]) -> None:
    """Where the adapter is, who wrote it, and the config fields that shape it."""
    print(f"adapter   {directory}")
    print(f"weights   {weights_file.name} ({byte_size(weights_file.stat().st_size)})")
    if "loraplug" in extras:
        print(f"written   by loraplug {metadata.get('loraplug.version', '?')} (file format "
              f"{metadata.get('loraplug.format')}); adapter name {extras.get('adapter', '?')!r}")
    else:
        print("written   by PEFT or another tool (no loraplug metadata)")
    if isinstance(raw, dict):
        # The fields that shape the adapter, in PEFT's names; empty ones are left out.
        fields = ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "bias",
                  "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                  "base_model_name_or_path", "task_type")
        shown = [f"{k}={json.dumps(raw[k])}" for k in fields
                 if raw.get(k) not in (None, [], {}, "")]
        print("config    " + "  ".join(shown))
    if unknown:
        print(f"config    fields loraplug ignores: {unknown}")


def cmd_inspect(args: argparse.Namespace) -> int:
    directory, weights_file = locate(Path(args.adapter_dir))
    raw = read_config(directory / CONFIG_NAME)
    state, metadata = read_adapter_weights(weights_file)
    config, problems, unknown = parse_config(raw)
    extras, found = read_metadata(metadata)
    problems += found
    entries, others, found = index_keys(state, set())
    problems += found

    _print_header(directory, weights_file, raw, extras, metadata, unknown)

    rows, params, nbytes, bad = [], 0, 0, []
    for path, slots in sorted(entries.items()):
        a = slots.get("A", (None, None, None))[1]
        b = slots.get("B", (None, None, None))[1]
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            problems.append(f"{path}: needs both lora_A and lora_B tensors")
            continue
        rank = a.shape[0]  # A is (r, in…) for every layer type, (r, V) for embeddings
        alpha_text = scaling_text = "?"
        if config is not None:
            want, alpha, source = config.spec(path)
            if want != rank:
                problems.append(f"{path}: tensors have rank {rank} but {source} says {want}")
            scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
            alpha_text, scaling_text = f"{alpha:g}", f"{scale:.4g}"
        finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) \
            if a.is_floating_point() and b.is_floating_point() else False
        if not finite:
            bad.append(path)
        dtype = str(a.dtype).removeprefix("torch.")
        if b.dtype != a.dtype:
            dtype += "/" + str(b.dtype).removeprefix("torch.")
        size = a.numel() * a.element_size() + b.numel() * b.element_size()
        params += a.numel() + b.numel()
        nbytes += size
        rows.append((path, str(rank), alpha_text, scaling_text, dims(a), dims(b), dtype,
                     byte_size(size), "yes" if finite else "NO"))
    print()
    if rows:
        print(table(("layer", "rank", "alpha", "scaling", "A", "B", "dtype", "size", "finite"),
                     rows, right=(1, 2, 3, 7)))
    layers = f"{len(rows)} layer{'s' if len(rows) != 1 else ''}"
    print(f"\n{layers}, {params:,} parameters, {byte_size(nbytes)} of tensors; "
          + ("all finite." if not bad else f"NaN or inf in {bad}."))
    if others:
        problems.append(f"{len(others)} tensors are not LoRA tensors: {sorted(others)[:5]}")
    for problem in problems:
        print(f"problem: {one_line(problem)}")
    return 1 if problems or bad else 0
