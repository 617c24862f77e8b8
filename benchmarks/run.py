"""``python -m benchmarks``: loraplug and PEFT side by side, printed as tables and saved as JSON.

Every scenario builds one base model, gives loraplug and PEFT the identical adapter
(the same A and B values), checks that both compute the same output, then times the
variants interleaved in one process: base, unmerged and merged forward, a training step
(forward + backward + AdamW) and its peak memory, inject/merge/unmerge/unload, and the
adapter file size. PEFT is measured when it is installed (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import exact, mixed, qlora, scenarios
from .timing import wait_for_quiet
from .twins import peft_available

MiB = 1 << 20


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    """What the figures depend on."""
    import loraplug

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "torch": torch.__version__,
        "loraplug": loraplug.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "load_at_start": os.getloadavg(),
    }
    if peft_available():
        import peft

        env["peft"] = peft.__version__
    return env


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _span(stats: dict[str, float]) -> str:
    return f"{_time(stats['median'])} [{_time(stats['low'])}–{_time(stats['high'])}]"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([title, line(header), line(["-" * w for w in widths]),
                      *map(line, rows), ""])


def _ratio(d: dict[str, float], key: str) -> str:
    return f"{d[key]:.3f}×" if key in d else "—"


def tables(results: dict[str, Any]) -> str:
    """The printed report: medians [min–max] and paired ratios."""
    runs = results["scenarios"]
    out = []
    rows = []
    for r in runs:
        f, ratio = r["forward"], r["forward_ratio"]
        rows.append([
            r["name"], _span(f["base"]),
            f"{_span(f['loraplug'])} {_ratio(ratio, 'loraplug')}",
            f"{_span(f['peft'])} {_ratio(ratio, 'peft')}" if "peft" in f else "—",
            f"{r['flops']['ratio']:.3f}×" if r["flops"]["base"] else "—",
            _ratio(ratio, "loraplug_merged"), _ratio(ratio, "peft_merged"),
            _ratio(ratio, "peft_over_loraplug"),
        ])
    out.append(_table(
        "Forward (no_grad), median [min–max] per call; ratios are paired medians over the base",
        ["scenario", "base", "loraplug unmerged", "PEFT unmerged", "extra FLOPs",
         "lp merged", "PEFT merged", "PEFT / lp"], rows))
    rows = []
    for r in runs:
        t, peak = r["train"], r["train_peak_bytes"]
        rows.append([
            r["name"], _span(t["loraplug"]), _span(t["peft"]) if "peft" in t else "—",
            _ratio(r.get("train_ratio", {}), "loraplug_over_peft"),
            f"{peak['loraplug'] / MiB:.1f}", f"{peak['peft'] / MiB:.1f}" if "peft" in peak
            else "—",
        ])
    out.append(_table(
        "Training step (forward + backward + AdamW), median [min–max]; peak MiB above the "
        "model", ["scenario", "loraplug", "PEFT", "lp / PEFT", "lp peak MiB", "PEFT peak MiB"],
        rows))
    rows = []
    for r in runs:
        a = r["admin"]

        def cell(op: str, who: str, a: dict[str, Any] = a) -> str:
            return _time(a[op][who]["median"]) if who in a[op] else "—"
        merge_rw = a["merge"]["loraplug"]["median"] / a["merge"]["read_write"]["median"]
        rows.append([
            r["name"], f"{cell('inject', 'loraplug')} / {cell('inject', 'peft')}",
            f"{cell('merge', 'loraplug')} / {cell('merge', 'peft')}",
            f"{cell('unmerge', 'loraplug')} / {cell('unmerge', 'peft')}",
            f"{cell('merge', 'read_write')} ({merge_rw:.2f}×)",
            f"{cell('unload', 'loraplug')} / {cell('unload', 'peft')}",
            " / ".join(f"{r['file_bytes'][k] / 1024:.0f} KiB" for k in ("loraplug", "peft")
                       if k in r["file_bytes"]),
        ])
    out.append(_table(
        "Whole-model operations, median (loraplug / PEFT); merge floor = read+write each "
        "merged weight once", ["scenario", "inject", "merge", "unmerge",
                               "merge floor (lp merge ÷)", "unload", "adapter file"], rows))
    rows = []
    for r in results.get("mixed", []):
        f, ratio = r["forward"], r["ratio"]
        rows.append([
            r["name"], _span(f["base"]), _span(f["loraplug_one"]), _span(f["loraplug_mixed"]),
            _ratio(ratio, "loraplug_mixed_over_one"),
            _span(f["peft_mixed"]) if "peft_mixed" in f else "—",
            _ratio(ratio, "peft_mixed_over_loraplug_mixed"),
            _ratio(ratio, "peft_extra_over_loraplug_extra"),
        ])
    if rows:
        out.append(_table(
            f"Mixed adapters in one batch ({results['mixed'][0]['about']})",
            ["shape", "base", "lp one adapter", "lp per row", "per row ÷ one",
             "PEFT adapter_names", "PEFT ÷ lp", "PEFT ÷ lp above base"], rows))
    rows = []
    for r in results.get("merge_exact", []):
        t = r["time"]

        def both(key: str, t: dict[str, Any] = t) -> str:
            return f"{_time(t[key]['merge'])} / {_time(t[key]['unmerge'])}" if key in t else "—"
        rows.append([
            r["model"], r["dtype"], r["adapters"], both("exact"), both("inexact"),
            both("in_place"), both("peft"), f"{t['exact']['merge_over_in_place']:.2f}×",
            f"{100 * t['exact']['check_share']:.1f}%", f"{r['side_per_weight_byte']:.3f}",
            " / ".join(f"{100 * r['drift'][k]:.1f}%" for k in ("exact", "peft")
                       if k in r["drift"]),
        ])
    if rows:
        out.append(_table(
            "Exact merge: merge / unmerge per model, medians; side bytes per weight byte; "
            f"entries changed after {results['merge_exact'][0]['cycles']} cycles",
            ["model", "dtype", "adapters", "exact", "exact=False", "in place (before)",
             "PEFT", "exact ÷ in place", "check", "side B/B", "drift exact / PEFT"],
            rows))
    q = results.get("qlora")
    if q:
        def mib(key: str, who: str) -> str:
            return f"{q[key][who] / MiB:.1f}" if who in q[key] else "—"
        rows = [[who, mib("resident_bytes", who), mib("step_peak_bytes", who),
                 mib("peak_bytes", who), _span(q["train"][who]) if who in q["train"] else "—"]
                for who in ("loraplug", "peft", "fp32") if who in q["peak_bytes"]]
        ratios = q["memory_ratio"]
        out.append(_table(
            f"QLoRA training step ({q['about']}); MiB: resident = weights, quantization "
            "statistics, adapters, AdamW state; step = peak allocated during the step above it",
            ["model", "resident MiB", "step MiB", "peak MiB", "step time"], rows)
            + f"peak: loraplug nf4 / loraplug fp32 {ratios['loraplug_over_fp32']:.3f}×"
            + (f", loraplug / PEFT {ratios['loraplug_over_peft']:.3f}×"
               if "loraplug_over_peft" in ratios else "")
            + (f"; step time loraplug / PEFT {q['train_ratio']['loraplug_over_peft']:.3f}× "
               "(paired median)\n" if "train_ratio" in q else "\n"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few rounds: a smoke test, not a measurement")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="scenarios to run (names as printed; 'mixed' for mixed batches, "
                             "'merge-exact' for exact merging)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: %(default)s)")
    parser.add_argument("--no-peft", action="store_true", help="measure loraplug alone")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed phase, wait up to SECONDS for the CPUs to be "
                             "90%% idle (for machines shared with other work)")
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks.json"),
                        help="where to write the JSON results (default: %(default)s)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:6.1f}s] {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)
    chosen = scenarios.scenarios(args.quick)
    known = [s.name for s in chosen] + ["mixed", "merge-exact", "qlora"]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {known}")
    if not args.no_peft and not peft_available():
        log("peft is not installed: measuring loraplug alone (pip install -e .[bench])")
    results: dict[str, Any] = {"environment": environment(args.threads), "quick": args.quick,
                               "scenarios": [], "mixed": [], "merge_exact": []}
    def settle() -> float | None:
        if not args.quiet_wait:
            return None
        busy = wait_for_quiet(args.quiet_wait)
        log(f"CPUs {100 * busy:.0f}% busy with other work" if busy is not None else
            "CPU load unknown")
        return busy

    for sc in chosen:
        if args.only and sc.name not in args.only:
            continue
        results["scenarios"].append(scenarios.run(sc, use_peft=not args.no_peft, log=log,
                                                  settle=settle))
    if not args.only or "mixed" in args.only:
        results["mixed"] = mixed.run(quick=args.quick, use_peft=not args.no_peft, log=log,
                                     settle=settle)
    if not args.only or "merge-exact" in args.only:
        results["merge_exact"] = exact.run(quick=args.quick, use_peft=not args.no_peft,
                                           log=log, settle=settle)
    if not args.only or "qlora" in args.only:
        missing = qlora.available()
        if missing:
            log(f"qlora skipped: {missing}")
        else:
            results["qlora"] = qlora.run(quick=args.quick, use_peft=not args.no_peft, log=log,
                                         settle=settle)
    results["environment"]["load_at_end"] = os.getloadavg()
    results["environment"]["seconds"] = round(time.perf_counter() - started, 1)

    env = results["environment"]
    print(f"loraplug {env['loraplug']}, torch {env['torch']}, peft {env.get('peft', '—')}, "
          f"{env['threads']} threads on {env['cpu']}, load {env['load_at_start']}"
          f"→{env['load_at_end']}, {env['seconds']} s\n")
    print(tables(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0
