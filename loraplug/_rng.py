"""Keeping the caller's random number generators as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def rng_untouched(modules: list[nn.Module]) -> Iterator[None]:
    """Run the block with the RNGs of the CPU and of the modules' device forked.

    Loading injects layers, whose initial values are drawn and then overwritten by the
    file's: the caller's random streams must not move because of that.
    """
    devices = {t.device for m in modules for t in m.parameters(recurse=False)
               if t.device.type != "cpu"}
    kinds = {d.type for d in devices}
    if len(kinds) == 1:
        with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}),
                                   device_type=kinds.pop()):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield
