"""``python -m benchmarks.against OTHER``: this checkout's loraplug against another one's.

For a change that touches the hot path. Both versions are imported into one process
(the other one from ``OTHER/loraplug`` under the name ``loraplug_other``), each gets a copy
of the same base model with the same adapters (A and B copied), both are checked to
compute the same output, and every round times the base model, this version and the
other in a fresh random order, so a shared machine's load hits both alike. Reported per
scenario: paired median ratios (this ÷ other) of the unmerged forward, the training step,
merge + unmerge and, for ``mixed-decode``, ``adapter_per_sample``; below 1 is faster.

    python -m benchmarks.against ../loraplug-before --only linear-call gpt-all conv2d
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import loraplug

from .models import GPT, linear_names
from .run import environment
from .scenarios import Scenario, _train_step, scenarios
from .timing import calibrate, interleaved
from .twins import max_difference, randomize

OTHER = "loraplug_other"


def import_other(checkout: Path) -> ModuleType:
    """The ``loraplug`` package of another checkout, imported as ``loraplug_other``."""
    init = checkout / "loraplug" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{checkout} has no loraplug/__init__.py; pass a checkout's root.")
    spec = importlib.util.spec_from_file_location(
        OTHER, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[OTHER] = module
    spec.loader.exec_module(module)
    return module


def twins(lib: ModuleType, other: ModuleType, base: nn.Module, targets: list[str], rank: int,
          alpha: float, adapters: tuple[str, ...] = ("default",)) -> tuple[nn.Module, nn.Module]:
    """Copies of ``base`` with the same adapters from this version and the other one."""
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for i, name in enumerate(adapters):
        lib.inject_lora(ours, target=targets, rank=rank, alpha=alpha, name=name)
        other.inject_lora(theirs, target=targets, rank=rank, alpha=alpha, name=name)
        randomize(ours, seed=i, names=[name])
    theirs.load_state_dict(ours.state_dict())
    for lib_, model in ((lib, ours), (other, theirs)):
        lib_.set_adapter(model, adapters[0])
    return ours, theirs


def _ratios(fns: dict[str, Callable[[], object]], rounds: int, sample_s: float) -> dict[str, float]:
    inner = calibrate(fns["this"], sample_s) if sample_s else 1
    timing = interleaved(fns, rounds=rounds, inner=inner)
    out = {"this_over_other": timing.ratio("this", "other"),
           "this_s": timing.stats["this"].median, "other_s": timing.stats["other"].median}
    if "base" in fns:
        out["this_over_base"] = timing.ratio("this", "base")
        out["other_over_base"] = timing.ratio("other", "base")
    return out


def compare(sc: Scenario, other: ModuleType) -> dict[str, Any]:
    """Forward, training step and merge + unmerge of one scenario, both versions."""
    base = sc.build()
    x = sc.inputs()
    ours, theirs = twins(loraplug, other, base, sc.targets(base), sc.rank, sc.alpha)
    calls = {"base": sc.entry(base), "this": sc.entry(ours), "other": sc.entry(theirs)}
    with torch.no_grad():
        fns = {k: (lambda f=f: f(x)) for k, f in calls.items()}
        difference = max_difference(fns["this"](), fns["other"]())
        if difference > 1e-5:
            raise AssertionError(f"{sc.name}: the two versions differ by {difference}")
        result: dict[str, Any] = {"name": sc.name, "difference": difference,
                                  "forward": _ratios(fns, sc.rounds, sc.sample_s)}
        merges = {"this": lambda: (loraplug.merge(ours), loraplug.unmerge(ours)),
                  "other": lambda: (other.merge(theirs), other.unmerge(theirs))}
        result["merge_unmerge"] = _ratios(merges, sc.admin_rounds * 3, 0.0)
    steps = {}
    for key, model in (("this", ours), ("other", theirs)):
        model.train()
        steps[key] = _train_step(sc.entry(model), x)
    result["train"] = _ratios(steps, sc.train_rounds, sc.sample_s)
    return result


def compare_mixed(other: ModuleType, quick: bool) -> dict[str, Any]:
    """16 adapters, one per row of a 16-row decode batch, through ``adapter_per_sample``."""
    shape = dict(layers=2, dim=256, heads=4, vocab=1024, context=64) if quick else \
        dict(layers=6, dim=768, heads=12, vocab=8192, context=128)
    torch.manual_seed(0)
    base = GPT(**shape).eval()
    names = tuple(f"a{i}" for i in range(16))
    ours, theirs = twins(loraplug, other, base, linear_names(base, ("q", "v")), 16, 32, names)
    ids = torch.randint(0, shape["vocab"], (16, 1), generator=torch.Generator().manual_seed(2))

    def mixed(lib: ModuleType, model: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with lib.adapter_per_sample(model, list(names)):
                return model(ids)
        return call

    with torch.no_grad():
        fns = {"base": lambda: base(ids), "this": mixed(loraplug, ours),
               "other": mixed(other, theirs)}
        difference = max_difference(fns["this"](), fns["other"]())  # type: ignore[arg-type]
        if difference > 1e-5:
            raise AssertionError(f"mixed-decode: the two versions differ by {difference}")
        return {"name": "mixed-decode", "difference": difference,
                "forward": _ratios(fns, 3 if quick else 15, 0.0)}


def _cell(d: dict[str, float] | None) -> str:
    return "—" if d is None else f"{d['this_over_other']:.3f}×"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.against", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="root of the other checkout")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="scenarios (names as in python -m benchmarks; 'mixed-decode')")
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("out/against.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    other = import_other(args.other.resolve())
    wanted = set(args.only) if args.only else None
    results = []
    for sc in scenarios(args.quick):
        if wanted is None or sc.name in wanted:
            print(f"{sc.name} ...", flush=True)
            results.append(compare(sc, other))
    if wanted is None or "mixed-decode" in wanted:
        print("mixed-decode ...", flush=True)
        results.append(compare_mixed(other, args.quick))
    print("\nthis ÷ other (paired medians; below 1 is faster)")
    print(f"{'scenario':<18}{'forward':>10}{'train step':>12}{'merge+unmerge':>15}"
          f"{'this ÷ base':>13}{'other ÷ base':>14}")
    for r in results:
        fwd = r["forward"]
        print(f"{r['name']:<18}{_cell(fwd):>10}{_cell(r.get('train')):>12}"
              f"{_cell(r.get('merge_unmerge')):>15}{fwd['this_over_base']:>12.3f}×"
              f"{fwd['other_over_base']:>13.3f}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    env["other"] = str(args.other)
    args.out.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
