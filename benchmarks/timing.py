"""Measuring: interleaved timings with medians and ranges, peak memory, FLOPs."""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the rounds: median and range."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Timing:
    """Per-variant stats plus the raw per-round samples (for paired ratios)."""

    stats: dict[str, Stats]
    samples: dict[str, list[float]]

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of ``num / den`` measured in the same round.

        Pairing within a round cancels most of the drift of a shared machine's load.
        """
        return statistics.median(a / b for a, b in zip(self.samples[num], self.samples[den]))


def calibrate(fn: Callable[[], object], target_s: float) -> int:
    """How many calls make one sample of about ``target_s`` seconds (at least 1)."""
    fn()
    n, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= target_s / 4 or n >= 1 << 20:
            break
        n *= 4
    return max(1, round(n * target_s / max(elapsed, 1e-9)))


def interleaved(variants: dict[str, Callable[[], object]], *, rounds: int, inner: int = 1,
                warmup: int = 1, seed: int = 0) -> Timing:
    """Time every variant once per round, in a fresh random order each round.

    Each sample is the mean of ``inner`` back-to-back calls. Garbage collection is off
    while timing so that it lands on no variant in particular.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(seed)
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for key in order:
                fn = variants[key]
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[key].append((time.perf_counter() - start) / inner)
    finally:
        gc.enable()
    return Timing({k: Stats.of(v) for k, v in samples.items()}, samples)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes held by tensors allocated during ``fn`` (CPU), above what existed before.

    From the profiler's memory records, in time order: each operator's own allocations
    at its start, frees where they happen. Temporaries freed inside one operator
    cancel out, so this is the peak between operators.
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += (event.cpu_memory_usage if event.name == "[memory]"
                    else event.self_cpu_memory_usage)
        peak = max(peak, current)
    return peak


def flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of the matmuls, convolutions and attention in ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def busy_fraction(window_s: float = 2.0) -> float | None:
    """Fraction of all CPUs busy (with other work) over the next ``window_s`` seconds."""
    start = _cpu_times()
    time.sleep(window_s)
    end = _cpu_times()
    if start is None or end is None or end[1] == start[1]:
        return None
    return 1.0 - (end[0] - start[0]) / (end[1] - start[1])


def wait_for_quiet(max_wait_s: float, busy_below: float = 0.1) -> float | None:
    """Sleep until the machine is nearly idle (at most ``max_wait_s``); the last busy fraction.

    On a machine shared with other work, a 2-thread matmul stalls whenever one of its
    threads is descheduled; measuring while others compute says little.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = busy_fraction()
        if busy is None or busy < busy_below or time.monotonic() >= deadline:
            return busy
