"""``loraplug inspect``: an adapter directory's layers, ranks, sizes and finiteness."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

# The readers load_adapter uses, so that inspect sees a file exactly as loading does.
from .._bounded import tensor_problem
from .._format import (
    CONFIG_NAME,
    Slots,
    index_keys,
    locate,
    read_adapter_weights,
    read_config,
    read_metadata,
)
from .._lock import locked
from .._peft_config import PeftLoRAConfig, parse_config
from .._regex import RegexRefused, work_limit
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
    with locked([directory], shared=True):  # both files from one save
        raw = read_config(directory / CONFIG_NAME)
        state, metadata = read_adapter_weights(weights_file)
    config, problems, unknown = parse_config(raw)
    extras, found = read_metadata(metadata)
    problems += found
    entries, others, found = index_keys(state, set())
    problems += found

    _print_header(directory, weights_file, raw, extras, metadata, unknown)

    rows, params, nbytes, bad = [], 0, 0, []
    with work_limit():  # the config's regexes, matched in bounded time
        for path, slots in sorted(entries.items()):
            row = _layer_row(path, slots, config, problems)
            if row is None:
                continue
            cells, a, b, finite = row
            if not finite:
                bad.append(path)
            params += a.numel() + b.numel()
            nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
            rows.append(cells)
    print()
    if rows:
        print(table(("layer", "rank", "alpha", "scaling", "A", "B", "dtype", "size", "finite"),
                     rows, right=(1, 2, 3, 7)))
    layers = f"{len(rows)} layer{'s' if len(rows) != 1 else ''}"
    print(f"\n{layers}, {params:,} parameters, {byte_size(nbytes)} of tensors; "
          + ("all finite." if not bad else f"NaN or inf in {bad}."))
    if others:
        problems.append(f"{len(others)} tensors are not LoRA tensors: {sorted(others)[:5]}")
    for problem in dict.fromkeys(problems):  # a regex past its limit fails on every row
        print(f"problem: {one_line(problem)}")
    return 1 if problems or bad else 0


def _layer_row(path: str, slots: Slots, config: PeftLoRAConfig | None,
               problems: list[str]) -> tuple[tuple[str, ...], Tensor, Tensor, bool] | None:
    """One row of the table, or ``None`` (with the reason in ``problems``)."""
    found, reasons = [], []
    for slot in "AB":
        key, value, _ = slots.get(slot, ("", None, ""))
        why = "needs both lora_A and lora_B tensors" if value is None \
            else tensor_problem(key, value)
        if why:
            reasons.append(f"{path}: {why}")
        found.append(value)
    if reasons:
        problems += dict.fromkeys(reasons)  # once, when both are missing
        return None
    a, b = cast(Tensor, found[0]), cast(Tensor, found[1])
    if a.dim() < 2 or b.dim() < 2:
        problems.append(f"{path}: A has shape {tuple(a.shape)} and B {tuple(b.shape)}; an "
                        "adapter's A is (r, in…) and its B (out, r…)")
        return None
    if a.shape[0] == 0:
        problems.append(f"{path}: A {tuple(a.shape)} and B {tuple(b.shape)} have rank 0, an "
                        "empty adapter; a rank is at least 1")
        return None
    rank = a.shape[0]  # A is (r, in…) for every layer type, (r, V) for embeddings
    alpha_text = scaling_text = "?"
    if config is not None:
        try:
            want, alpha, source = config.spec(path)
        except RegexRefused as err:
            problems.append(f"{CONFIG_NAME}: the regex {err}; name the modules in a list instead")
        else:
            if want != rank:
                problems.append(f"{path}: tensors have rank {rank} but {source} says {want}")
            scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
            alpha_text, scaling_text = f"{alpha:g}", f"{scale:.4g}"
    # float8 has no isfinite: check in float32, where every float8 value is exact.
    finite = bool(torch.isfinite(a.float()).all()) and bool(torch.isfinite(b.float()).all())
    dtype = str(a.dtype).removeprefix("torch.")
    if b.dtype != a.dtype:
        dtype += "/" + str(b.dtype).removeprefix("torch.")
    size = a.numel() * a.element_size() + b.numel() * b.element_size()
    return ((path, str(rank), alpha_text, scaling_text, dims(a), dims(b), dtype, byte_size(size),
             "yes" if finite else "NO"), a, b, finite)
