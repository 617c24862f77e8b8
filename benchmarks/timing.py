"""Measuring: interleaved timings with medians and ranges, peak memory, FLOPs."""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
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


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
