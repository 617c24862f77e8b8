"""Exact merging: time and side memory against the in-place merge and PEFT's, and drift.

For each model, dtype and adapter size, the same adapters in loraplug and PEFT:

- **time** of a whole-model merge and unmerge, interleaved over rounds: loraplug's exact
  merge (the default), the same with ``exact=False`` (nothing kept), the same with the
  finiteness check switched off (what the check costs), the in-place ``W += ΔW`` that
  merged before (no check, no residual), and PEFT's ``merge_adapter`` /
  ``unmerge_adapter``;
- **side memory** of exact unmerging: the residual bytes kept per byte of the merged
  weights;
- **drift**: the fraction of weight entries that differ from the original after
  ``cycles`` merge/unmerge cycles, exact and PEFT's (``exact=False`` drifts as PEFT).

Adapter entries have std 0.02 (``trained``) or 0.5 (``large``: ΔW dwarfs W, the case
where rounding destroys most of W's low bits).
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import loraplug as lp
from loraplug import _exact

from .models import GPT, linear_names
from .twins import lp_layers, peft_available, peft_twin, randomize

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = {"trained": 0.02, "large": 0.5}


def _models(quick: bool) -> list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module],
                                                                            list[str]], int]]:
    gpt = dict(layers=1, dim=64, heads=4, vocab=256, context=16) if quick else \
        dict(layers=4, dim=512, heads=8, vocab=8192, context=256)
    vocab, dim = (512, 64) if quick else (32000, 512)
    channels = 16 if quick else 256
    return [
        (f"gpt {gpt['layers']}×d{gpt['dim']}, r16 on every linear layer",
         lambda: GPT(**gpt), lambda m: linear_names(m), 16),
        (f"embedding {vocab}×{dim}, r16", lambda: nn.Sequential(nn.Embedding(vocab, dim)),
         lambda m: ["0"], 16),
        (f"4 × conv2d {channels}→{channels} 3×3, r8",
         lambda: nn.Sequential(*(nn.Conv2d(channels, channels, 3) for _ in range(4))),
         lambda m: [str(i) for i in range(4)], 8),
    ]


def _scale(model: nn.Module, std: float) -> None:
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".lora_A." in key or ".lora_B." in key:
                p.mul_(std / 0.02)  # randomize() draws std 0.02


@torch.no_grad()
def _in_place(model: nn.Module, sign: int) -> None:
    # The merge before exact merging: W ± ΔW written in place, nothing checked or kept.
    for _, layer in lp_layers(model):
        weight = layer.weight
        names = layer.held_active
        if weight.dtype in (torch.float16, torch.bfloat16):
            weight.copy_(layer._adapted_weight(names, layer.scaling, sign))
        else:
            layer._accumulate(weight, names, layer.scaling, sign)


def _unchecked(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        finite = _exact._finite
        _exact._finite = lambda t: True  # type: ignore[assignment]
        try:
            return fn()
        finally:
            _exact._finite = finite
    return run


def _weights(model: nn.Module) -> list[torch.Tensor]:
    layers = lp_layers(model)
    if layers:
        return [layer.weight for _, layer in layers]
    from peft.tuners.lora import LoraLayer  # a PEFT model

    return [m.get_base_layer().weight for m in model.modules() if isinstance(m, LoraLayer)]


def _cycle_pairs(ours: nn.Module, theirs: Any) -> dict[str, tuple[Callable[[], object], ...]]:
    pairs: dict[str, tuple[Callable[[], object], ...]] = {
        "exact": (lambda: lp.merge(ours[0]), lambda: lp.unmerge(ours[0])),
        "inexact": (lambda: lp.merge(ours[1], exact=False), lambda: lp.unmerge(ours[1])),
        "unchecked": (_unchecked(lambda: lp.merge(ours[2])), lambda: lp.unmerge(ours[2])),
        "in_place": (lambda: _in_place(ours[3], 1), lambda: _in_place(ours[3], -1)),
    }
    if theirs is not None:
        pairs["peft"] = (theirs.merge_adapter, theirs.unmerge_adapter)
    return pairs


def _time(pairs: dict[str, tuple[Callable[[], object], ...]], rounds: int
          ) -> dict[str, dict[str, float]]:
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in pairs}
    order = list(pairs)
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(rounds):
            rng.shuffle(order)
            for key in order:
                merge, unmerge = pairs[key]
                start = time.perf_counter()
                merge()
                middle = time.perf_counter()
                unmerge()
                samples[key].append((middle - start, time.perf_counter() - middle))
    out = {k: {"merge": statistics.median(m for m, _ in v),
               "unmerge": statistics.median(u for _, u in v)} for k, v in samples.items()}
    for key in out:  # paired: within each round, over the in-place merge's time
        out[key]["merge_over_in_place"] = statistics.median(
            a[0] / b[0] for a, b in zip(samples[key], samples["in_place"]))
    out["exact"]["check_share"] = statistics.median(
        (a[0] - b[0]) / a[0] for a, b in zip(samples["exact"], samples["unchecked"]))
    return out


def _drift(pairs: dict[str, tuple[Callable[[], object], ...]], weights: dict[str, list],
           cycles: int) -> dict[str, float]:
    originals = {k: [w.detach().clone() for w in ws] for k, ws in weights.items()}
    with torch.no_grad():
        for _ in range(cycles):
            for merge, unmerge in pairs.values():
                merge()
                unmerge()
    return {k: sum(int((w != o).sum()) for w, o in zip(weights[k], originals[k]))
            / sum(o.numel() for o in originals[k]) for k in weights}


def run(*, quick: bool, use_peft: bool, log: Callable[[str], None],
        settle: Callable[[], float | None] = lambda: None) -> list[dict[str, Any]]:
    """Every model × dtype × adapter size: time, side memory and drift."""
    use_peft = use_peft and peft_available()
    rounds, cycles = (1, 2) if quick else (5, 20)
    results = []
    for about, build, targets, rank in _models(quick):
        for dtype in DTYPES:
            for size, std in SIZES.items():
                torch.manual_seed(0)
                base = build().eval().to(dtype)
                names = targets(base)
                ours = copy.deepcopy(base)
                lp.inject_lora(ours, target=names, rank=rank, alpha=2 * rank)
                randomize(ours, seed=0)
                _scale(ours, std)
                theirs = peft_twin(base, ours, names, rank, 2 * rank) if use_peft else None
                copies = [copy.deepcopy(ours) for _ in range(4)]
                pairs = _cycle_pairs(copies, theirs)
                log(f"merge-exact: {about}, {dtype}, {size}")
                # Drift first, from the original weights (a second cycle of a plain merge
                # mostly repeats the first one's rounding).
                watched = {k: _weights(m) for k, m in
                           (("exact", copies[0]), ("peft", theirs)) if m is not None}
                drift = _drift({k: pairs[k] for k in watched}, watched, cycles)
                lp.merge(copies[0])
                weight_bytes = sum(w.numel() * w.element_size() for w in _weights(copies[0]))
                side = sum(f.residual.nbytes for _, layer in lp_layers(copies[0])
                           for f in layer._folds if f.residual is not None)
                lp.unmerge(copies[0])
                busy = settle()
                load = os.getloadavg()
                timing = _time(pairs, rounds)
                results.append({
                    "name": "merge-exact", "model": about, "dtype": str(dtype).split(".")[-1],
                    "adapters": size, "std": std, "weight_bytes": weight_bytes,
                    "side_bytes": side, "side_per_weight_byte": side / weight_bytes,
                    "time": timing, "cycles": cycles, "drift": drift, "busy": busy,
                    "load": {"before": load, "after": os.getloadavg()}})
    return results
