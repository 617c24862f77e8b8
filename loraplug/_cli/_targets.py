"""``loraplug targets``: what a target would wrap, as a dry run.

The ``path`` column says how each selected layer computes its adapter: ``branch`` (the
low-rank branch added to the layer's output) or ``weight`` (the layer's, or a bare
parameter's owner's, own forward run on W + ΔW: subclasses with their own forward,
grouped convolutions, parameters named with ``--target-parameter``).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import re
from dataclasses import dataclass, field

from torch import nn

from .._layer import LoRALayer
from .._quantized import describe_weight, parameter_count, weight_format
from .._registry import lookup, lora_layer_for, supported_types, type_name
from ._common import CLIError, build_model, count_of, parse_pattern, table, weight_shape


def cmd_targets(args: argparse.Namespace) -> int:
    from .._targeting import select

    if args.rank < 1:
        raise CLIError(f"--rank must be a positive integer; received {args.rank}", code=2)
    model = build_model(args.model, meta=True)
    chosen: dict[str, nn.Module] = {}
    if args.target:
        selection = select(model, [parse_pattern(t) for t in args.target],
                           [parse_pattern(t) for t in args.exclude] or None)
        chosen = selection.modules
    survey = _survey(model, chosen, args.rank)
    if args.target_parameter:
        _survey_parameters(model, args.target_parameter, args.rank, survey)
    selected = bool(chosen or args.target_parameter)
    rows = survey.rows
    header: tuple[str, ...] = ("", "layer", "type", "weight", "LoRA layer",
                               f"+params (r={args.rank})" if selected else "",
                               "path" if selected else "")
    shown = rows
    if any(quantized for quantized, _ in survey.stored):  # how each weight is stored
        header = (*header[:4], "stored (bytes/w)", *header[4:])
        shown = [(*row[:4], text, *row[4:]) for row, (_, text) in zip(rows, survey.stored)]
    print(table(header, shown, right=(len(header) - 2,)))
    legend = ["*: wrapped with this target", "path: branch (added to the output) or weight "
              "(its forward on W + ΔW)"] if selected else []
    legend += ["!: refused (see below)"] if survey.refused else []
    print("; ".join([*legend, "LoRA layer: the class that would wrap it (blank: none for "
                     "that type)"]))
    kept = [row[1] for row in rows if row[0] == "*"]
    total = parameter_count(model)  # a quantized weight at its logical size
    if selected:
        print(f"\n{count_of(len(kept), 'layer')} selected (*); rank {args.rank} adds "
              f"{survey.added:,} parameters to the model's {total:,} "
              f"({100 * survey.added / total if total else 0:.3f}%).")
    else:
        able = sum(1 for row in rows if row[4] and row[0] != "!")
        print(f"\n{count_of(able, 'layer')} can take LoRA ({', '.join(supported_types())}); pass "
              "--target PATTERN to see what a pattern selects.")
    only_rank = survey.rank_refused == set(survey.refused)
    _print_refusals(survey.refused, kept, selected,
                    _fitting_rank(survey.probes, args.rank) if only_rank else None)
    for note in survey.notes:
        print(f"note: {note}")
    return 1 if selected and survey.refused else 0


@dataclass
class _Survey:
    """The table's rows and what the report below it says."""

    rows: list[tuple[str, ...]] = field(default_factory=list)
    added: int = 0  # parameters the adapters of the layers marked * add
    refused: dict[str, str] = field(default_factory=dict)  # name -> why inject_lora refuses
    rank_refused: set[str] = field(default_factory=set)  # refused for the rank alone
    probes: list[LoRALayer] = field(default_factory=list)  # every selected layer's
    notes: list[str] = field(default_factory=list)
    #: per row: whether the weight is quantized, and how it is stored ("bnb nf4 dq 0.516")
    stored: list[tuple[bool, str]] = field(default_factory=list)


def _survey(model: nn.Module, chosen: dict[str, nn.Module], rank: int) -> _Survey:
    """Every layer with parameters or a LoRA type; selected ones are judged as inject does."""
    from .._targeting import candidates

    survey = _Survey()
    for name, _, module in candidates(model):
        found = lookup(type(module))
        if not name or (found is None and next(module.parameters(recurse=False), None) is None):
            continue
        mark, params, why, path = "", "", "", ""
        lora = "" if found is None else found[0].__name__
        if name in chosen:
            probe = lora_layer_for(module)
            survey.probes.append(probe)
            rank_why = probe.check_rank(rank)
            if rank_why and not why:
                survey.rank_refused.add(name)
                why = _reason(rank_why)
            if not why:
                shape_a, shape_b = probe.adapter_shapes(rank)
                count = math.prod(shape_a) + math.prod(shape_b)
                mark, params, survey.added = "*", f"{count:,}", survey.added + count
                path = "weight" if probe.through_weight else "branch"
                if rank > probe.max_rank():
                    survey.notes.append(f"{name}: rank {rank} exceeds the rank ΔW can have "
                                        f"there ({probe.max_rank()}); the extra parameters "
                                        "add nothing.")
        if why:
            mark, survey.refused[name] = "!", why
        survey.rows.append(
            (mark, name, type_name(type(module)), weight_shape(module), lora, params, path))
        described = describe_weight(module)
        survey.stored.append((weight_format(module) is not None,
                              f"{described[0]} {described[1]:.3g}" if described else ""))
    return survey


def _survey_parameters(model: nn.Module, patterns: list[str], rank: int,
                       survey: _Survey) -> None:
    """One row per parameter ``--target-parameter`` selects, as inject_lora adapts it."""
    from .._parameter import LoRAParameter, LoRAParameterHost
    from .._parameter_targeting import select_parameters

    specs = [re.compile(p[3:]) if p.startswith("re:") else p for p in patterns]
    for name, target in select_parameters(model, specs).parameters.items():
        owner = target.owner
        probe = target.layer or LoRAParameter(
            owner if isinstance(owner, LoRAParameterHost) else LoRAParameterHost(owner),
            target.parameter)
        count = sum(math.prod(shape) for shape in probe.adapter_shapes(rank))
        survey.added += count
        survey.rows.append(("*", name, f"parameter of {type_name(type(probe.base_layer))}",
                            "×".join(map(str, target.value.shape)), "LoRAParameter",
                            f"{count:,}", "weight"))
        survey.stored.append((False, ""))


def _print_refusals(refused: dict[str, str], kept: list[str], selected: bool,
                    rank: int | None) -> None:
    """The layers marked ``!``, why, and the options that avoid them."""
    if not refused:
        return
    n = count_of(len(refused), "more layer" if selected else "layer")
    if selected:
        print(f"{n} selected cannot take it (!), so inject_lora would refuse this target "
              "and change nothing:")
    else:
        print(f"{n} of a LoRA type cannot take one here (!):")
    for name, why in refused.items():
        print(f"! {name}: {why}")
    exclude = " ".join(f"--exclude '{p}'" for p in _exclude_patterns(list(refused), kept))
    if rank is not None:
        print(f"To go ahead: --rank {rank} fits every selected layer; or leave the ! layers "
              f"out with {exclude}")
    else:
        print(f"To go ahead, leave the ! layers out: {exclude}" if selected
              else f"Leave them out of a target with {exclude}")


def _reason(message: str) -> str:
    """The first sentence of a refusal: why. The rest is advice for Python callers."""
    return re.split(r"(?<=\.)\s+(?=[A-Z])", message.strip(), maxsplit=1)[0]


def _exclude_patterns(refused: list[str], kept: list[str]) -> list[str]:
    """Short ``--exclude`` globs for ``refused`` that leave every name in ``kept`` alone."""
    patterns: list[str] = []
    for name in refused:
        leaf = name.rsplit(".", 1)[-1]
        leaf = f"*.{leaf}" if "." in name and not leaf.isdigit() else name
        pattern = name if any(fnmatch.fnmatchcase(k, leaf) for k in kept) else leaf
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            patterns.append(pattern)
    return patterns


def _fitting_rank(probes: list[LoRALayer], rank: int) -> int | None:
    """The smallest rank above ``rank`` that every selected layer takes, if one is near."""
    if not probes:
        return None
    return next((r for r in range(rank + 1, rank + 4097)
                 if all(p.check_rank(r) is None for p in probes)), None)
