"""``loraplug targets``: what a target would wrap, as a dry run.

The ``path`` column says how each selected layer computes its adapter: ``branch`` (the
low-rank branch added to the layer's output) or ``weight`` (the layer's, or a bare
parameter's owner's, own forward run on W + ΔW: subclasses with their own forward,
grouped convolutions, parameters named with ``--target-parameter``).
"""

from __future__ import annotations

import argparse
import math
import re

from torch import nn

from .._registry import lookup, lora_layer_for, supported_types, type_name
from ._common import CLIError, _pattern, _shape, _table, build_model


def _parameter_rows(model: nn.Module, patterns: list[str], rank: int) -> list[tuple[str, ...]]:
    # One row per parameter --target-parameter selects, as inject_lora would adapt it.
    from .._parameter import LoRAParameter, LoRAParameterHost
    from .._parameter_targeting import select_parameters

    rows: list[tuple[str, ...]] = []
    specs = [re.compile(p[3:]) if p.startswith("re:") else p for p in patterns]
    selection = select_parameters(model, specs)
    for name, target in selection.parameters.items():
        owner = target.owner
        probe = target.layer or LoRAParameter(
            owner if isinstance(owner, LoRAParameterHost) else LoRAParameterHost(owner),
            target.parameter)
        count = sum(math.prod(shape) for shape in probe.adapter_shapes(rank))
        rows.append(("*", name, f"parameter of {type_name(type(probe.base_layer))}",
                     "×".join(map(str, target.value.shape)), "yes", f"{count:,}", "weight"))
    return rows


def cmd_targets(args: argparse.Namespace) -> int:
    from .._targeting import candidates, select

    if args.rank < 1:
        raise CLIError(f"--rank must be a positive integer; received {args.rank}", code=2)
    model = build_model(args.model, meta=True)
    chosen: dict[str, nn.Module] = {}
    if args.target:
        selection = select(model, [_pattern(t) for t in args.target],
                           [_pattern(t) for t in args.exclude] or None)
        chosen = selection.modules
    total = sum(p.numel() for p in model.parameters())
    rows: list[tuple[str, ...]] = []
    added, notes = 0, []
    for name, _, module in candidates(model):
        found = lookup(type(module))
        if not name or (found is None and next(module.parameters(recurse=False), None) is None):
            continue
        mark, params, path = "", "", ""
        if name in chosen:
            probe = lora_layer_for(module)
            why = probe.check_rank(args.rank)
            shape_a, shape_b = probe.adapter_shapes(args.rank)
            count = math.prod(shape_a) + math.prod(shape_b)
            added += count
            mark, params = "*", f"{count:,}"
            path = "weight" if probe.through_weight else "branch"
            if why:
                notes.append(f"{name}: {why}")
                mark = "!"
            elif args.rank > probe.max_rank():
                notes.append(f"{name}: rank {args.rank} exceeds the rank ΔW can have there "
                             f"({probe.max_rank()}); the extra parameters add nothing")
        supported = "" if found is None else "yes"
        rows.append((mark, name, type_name(type(module)), _shape(module), supported, params, path))
    parameter_rows = _parameter_rows(model, args.target_parameter, args.rank) \
        if args.target_parameter else []
    rows += parameter_rows
    added += sum(int(row[5].replace(",", "")) for row in parameter_rows)
    chosen_count = len(chosen) + len(parameter_rows)
    header = ("", "layer", "type", "weight", "LoRA",
              f"+params (r={args.rank})" if chosen_count else "", "path" if chosen_count else "")
    print(_table(header, rows, right=(5,)))
    if chosen_count:
        print(f"\n{chosen_count} layers selected (*); rank {args.rank} adds {added:,} parameters "
              f"to the model's {total:,} ({100 * added / total if total else 0:.3f}%).")
        refused = sum(1 for row in rows if row[0] == "!")
        if refused:
            print(f"inject_lora would refuse the {refused} layer(s) marked !:")
        for note in notes:
            print(f"! {note}")
    else:
        able = sum(1 for row in rows if row[4])
        print(f"\n{able} layers can take LoRA ({', '.join(supported_types())}); pass --target "
              "PATTERN to see what a pattern selects.")
    return 1 if any(row[0] == "!" for row in rows) else 0
