"""Mixed adapters in one batch: 16 adapters, one per row, against one adapter for all rows."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import torch

import loraplug as lp

from .models import GPT, linear_names
from .timing import interleaved
from .twins import loraplug_twin, max_difference, peft_available, peft_twin

ADAPTERS = 16


def run(*, quick: bool, use_peft: bool, log: Callable[[str], None],
        settle: Callable[[], float | None] = lambda: None) -> list[dict[str, Any]]:
    """Decode (1 token per row) and prefill (128 tokens per row) shapes."""
    use_peft = use_peft and peft_available()
    shape = dict(layers=2, dim=256, heads=4, vocab=1024, context=128) if quick else \
        dict(layers=6, dim=768, heads=12, vocab=8192, context=128)
    torch.manual_seed(0)
    base = GPT(**shape).eval()
    targets = linear_names(base, ("q", "v"))
    names = [f"a{i}" for i in range(ADAPTERS)]
    rank, alpha = 16, 32
    model = loraplug_twin(base, targets, rank, alpha, adapters=names)
    peft_model = peft_twin(base, model, targets, rank, alpha, adapters=names) if use_peft \
        else None
    peft_inner = peft_model.get_base_model() if peft_model is not None else None
    gen = torch.Generator().manual_seed(2)
    results = []
    for label, tokens in (("decode", 1), ("prefill", 32 if quick else 128)):
        ids = torch.randint(0, shape["vocab"], (ADAPTERS, tokens), generator=gen)
        log(f"mixed-{label}: check and time")

        def mixed(ids: torch.Tensor = ids) -> torch.Tensor:
            with lp.adapter_per_sample(model, names):
                return model(ids)

        fns: dict[str, Callable[[], object]] = {
            "base": lambda ids=ids: base(ids), "loraplug_one": lambda ids=ids: model(ids),
            "loraplug_mixed": mixed}
        checks: dict[str, float] = {}
        with torch.no_grad():
            out = mixed()
            for row in (0, ADAPTERS - 1):  # each row equals that row alone with its adapter
                lp.set_adapter(model, names[row])
                checks[f"row{row}_vs_alone"] = max_difference(out[row:row + 1],
                                                              model(ids[row:row + 1]))
            lp.set_adapter(model, names[0])
            if peft_model is not None:
                fns["peft_one"] = lambda ids=ids: peft_inner(ids)
                fns["peft_mixed"] = lambda ids=ids: peft_model(ids, adapter_names=names)
                checks["loraplug_vs_peft"] = max_difference(out, fns["peft_mixed"]())
                if checks["loraplug_vs_peft"] > 1e-4:
                    raise AssertionError(f"mixed {label}: loraplug and PEFT differ: {checks}")
            busy = settle()
            load_before = os.getloadavg()
            rounds = 3 if quick else (15 if label == "decode" else 7)
            inner_calls = 3 if label == "decode" else 1
            timing = interleaved(fns, rounds=rounds, inner=inner_calls)
        ratios = {"loraplug_mixed_over_one": timing.ratio("loraplug_mixed", "loraplug_one")}
        if peft_model is not None:
            ratios["peft_mixed_over_loraplug_mixed"] = timing.ratio("peft_mixed",
                                                                    "loraplug_mixed")
            ratios["peft_mixed_over_peft_one"] = timing.ratio("peft_mixed", "peft_one")
            # What mixing costs above the base model, PEFT's over loraplug's.
            ratios["peft_extra_over_loraplug_extra"] = statistics.median(
                (p - b) / max(m - b, 1e-12) for p, m, b in zip(
                    timing.samples["peft_mixed"], timing.samples["loraplug_mixed"],
                    timing.samples["base"]))
        results.append({
            "name": f"mixed-{label}",
            "about": f"{ADAPTERS} adapters (r{rank} on q, v), {ADAPTERS} rows × {tokens} "
                     f"token{'s' if tokens > 1 else ''}, GPT {shape['layers']}×d{shape['dim']}",
            "checks": checks,
            "forward": {k: s.as_dict() for k, s in timing.stats.items()},
            "ratio": ratios,
            "load": {"before": load_before, "after": os.getloadavg()},
            "busy": busy,
        })
    return results
