"""Merging that can be undone bit for bit: keep only what rounding destroyed.

Adding ΔW to a weight rounds: ``W' = fl(W + ΔW)`` in W's dtype (through float32 for
float16 and bfloat16). Subtracting again, ``V = fl(W' − ΔW)``, gives W back for most
entries but not all: the low bits of W that fell below the precision of W' are lost.
The residual

    r = bits(W) − bits(V)        (integer difference of the bit patterns, wrapped)

is zero where nothing was lost and small elsewhere, so it is stored compactly: the
non-zero entries as (index, value) pairs, or, when most entries are non-zero, one int8
per entry plus the few values that do not fit in it. Unmerging computes V again and
adds r to its bits, which is W exactly, after any number of cycles, in every dtype.

ΔW must be computed the same way at merge and at unmerge (same tensors, device and
thread settings): a checksum of W's bits, taken at merge, verifies the result.

The weight is processed in chunks, so the temporaries stay small and in cache; each
chunk is checked to be finite before it is written, and chunks already written are
restored exactly when a later one is not (a merge never destroys the base).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: The integer type with the bits of each float type.
BITS = {torch.float64: torch.int64, torch.float32: torch.int32,
        torch.bfloat16: torch.int16, torch.float16: torch.int16}
#: Entries per chunk: temporaries of about a megabyte each, in cache.
CHUNK = 1 << 18


class NotFinite(ArithmeticError):
    """``W + ΔW`` has NaN or inf entries; the weight was left as it was."""

    def __init__(self, start: int) -> None:
        super().__init__(f"non-finite entries from flat index {start}")
        self.start = start


@dataclass
class Residual:
    """What rounding destroyed when ΔW was added to one weight.

    ``bits(W) = bits(fl(W' − ΔW)) + dense + small + large`` in W's integer type
    (wrapping), where ``dense`` is one int8 per entry (absent when few entries are
    non-zero), ``small`` puts int8 ``values`` at the flat positions ``index``, and
    ``large`` puts full-width ``large_values`` at ``large_index``.
    """

    dtype: torch.dtype
    numel: int
    index: Tensor
    values: Tensor
    large_index: Tensor
    large_values: Tensor
    dense: Tensor | None = None
    checksum: int = 0  # of W's bits, to verify the unfold
    merged_checksum: int = 0  # of W''s bits, to see whether W' was written since
    layout: tuple[int, ...] = ()  # W's strides: the order of the flat positions

    @property
    def nbytes(self) -> int:
        """Bytes held: the side memory of exact unmerging for this weight."""
        tensors = [self.index, self.values, self.large_index, self.large_values]
        if self.dense is not None:
            tensors.append(self.dense)
        return sum(t.numel() * t.element_size() for t in tensors)

    def parts(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """(flat positions, values) to add, on ``device``."""
        pairs = [(self.index, self.values), (self.large_index, self.large_values)]
        return [(i.to(device), v.to(device)) for i, v in pairs if i.numel()]


class _Collector:
    """Builds a Residual chunk by chunk: sparse while that is smaller, then dense int8."""

    def __init__(self, numel: int, bits: torch.dtype, device: torch.device) -> None:
        self.numel, self.bits, self.device = numel, bits, device
        self.small: list[tuple[Tensor, Tensor]] = []
        self.large: list[tuple[Tensor, Tensor]] = []
        self.count = 0
        self.dense: Tensor | None = None
        self.checksum = 0

    def add(self, start: int, r: Tensor, original_bits: Tensor) -> None:
        self.checksum = (self.checksum + bit_sum(original_bits)) % 2**32
        if self.dense is None:
            where = r.nonzero().view(-1)
            self.count += where.numel()
            self._split(where, r[where], start)
            if self.count * 5 > self.numel:  # sparse costs ≥ 5 bytes an entry, dense 1
                self._to_dense()
            return
        clamped = r.clamp(-128, 127)
        self.dense[start:start + r.numel()] = clamped.to(torch.int8)
        where = (clamped != r).nonzero().view(-1)
        self.large.append((where + start, r[where] - clamped[where]))  # on top of dense

    def _split(self, where: Tensor, values: Tensor, start: int) -> None:
        fits = (values >= -128) & (values <= 127)
        self.small.append((where[fits] + start, values[fits].to(torch.int8)))
        self.large.append((where[~fits] + start, values[~fits]))

    def _to_dense(self) -> None:
        self.dense = torch.zeros(self.numel, dtype=torch.int8, device=self.device)
        for index, values in self.small:
            self.dense[index] = values
        self.small = []

    def finish(self, dtype: torch.dtype) -> Residual:
        index_type = torch.int32 if self.numel < 2**31 else torch.int64

        def joined(pairs: list[tuple[Tensor, Tensor]], kind: torch.dtype) -> tuple[Tensor, Tensor]:
            if not pairs:
                return (torch.zeros(0, dtype=index_type, device=self.device),
                        torch.zeros(0, dtype=kind, device=self.device))
            return (torch.cat([i for i, _ in pairs]).to(index_type),
                    torch.cat([v for _, v in pairs]).to(kind))

        index, values = joined(self.small, torch.int8)
        large_index, large_values = joined(self.large, self.bits)
        return Residual(dtype, self.numel, index, values, large_index, large_values,
                        self.dense, self.checksum)


def _order(weight: Tensor) -> list[int]:
    # The dimensions from the outermost in memory: a channels_last weight permuted by
    # them is contiguous, so its flat view writes through.
    strides = weight.stride()
    return sorted(range(weight.dim()), key=lambda i: -strides[i])


def _flat_weight(weight: Tensor) -> Tensor:
    """``weight`` as 1-d in its memory order."""
    return weight.view(-1) if weight.is_contiguous() else \
        weight.permute(_order(weight)).view(-1)


def _flat(weight: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``weight`` and ``delta`` as 1-d, both in the weight's memory order."""
    if weight.is_contiguous():
        return weight.view(-1), delta.reshape(-1)
    return _flat_weight(weight), delta.permute(_order(weight)).reshape(-1)


def _finite(t: Tensor) -> bool:
    # One summing pass; only a sum that overflows on finite entries needs the full check.
    if torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else
                            torch.float32)):
        return True
    return bool(torch.isfinite(t).all())


def _rounded(op: Callable[..., Tensor], a: Tensor, b: Tensor, out: Tensor,
             wide: Tensor | None) -> None:
    """``out = fl(op(a, b))`` in out's dtype, through ``wide`` (float32) when given."""
    if wide is None:
        op(a, b, out=out)
    else:
        out.copy_(op(a, b, out=wide[:out.numel()]))


@torch.no_grad()
def fold(weight: Tensor, delta: Tensor) -> Residual:
    """``weight ← fl(weight + delta)`` in place; returns what unfolding needs to undo it.

    ``delta`` is shaped like ``weight``, in the dtype the sum is computed in (float32
    for half weights). Raises NotFinite, with ``weight`` exactly as it was, when the
    result has NaN or inf entries.
    """
    w, d = _flat(weight, delta)
    bits = BITS[weight.dtype]
    size = min(CHUNK, w.numel())
    new, back = (torch.empty(size, dtype=w.dtype, device=w.device) for _ in range(2))
    # Half weights: the sums are computed in delta's float32, then rounded into W's dtype.
    wide = None if d.dtype == w.dtype else torch.empty(size, dtype=d.dtype, device=w.device)
    r = torch.empty(size, dtype=bits, device=w.device)
    collect = _Collector(w.numel(), bits, weight.device)
    merged_checksum = 0
    for start in range(0, w.numel(), CHUNK):
        wc, dc = w[start:start + CHUNK], d[start:start + CHUNK]
        n = wc.numel()
        _rounded(torch.add, wc, dc, new[:n], wide)
        if not _finite(new[:n]):
            _restore(weight, delta, collect.finish(weight.dtype), stop=start)
            raise NotFinite(start)
        _rounded(torch.sub, new[:n], dc, back[:n], wide)  # fl(W' − ΔW)
        original = wc.view(bits)
        collect.add(start, torch.sub(original, back[:n].view(bits), out=r[:n]), original)
        merged_checksum = (merged_checksum + bit_sum(new[:n].view(bits))) % 2**32
        wc.copy_(new[:n])
    residual = collect.finish(weight.dtype)
    residual.merged_checksum = merged_checksum
    residual.layout = weight.stride()
    return residual


@torch.no_grad()
def unfold(weight: Tensor, delta: Tensor, residual: Residual) -> bool:
    """Undo :func:`fold`: ``weight`` becomes the weight before it, bit for bit.

    Returns whether it did: False when the weight was written (or cast) since the fold,
    which then subtracts ``delta`` plainly, or when the result's checksum is not the
    original's (ΔW was computed differently: other A or B, device or thread settings).
    """
    if residual.dtype != weight.dtype or residual.layout != weight.stride() \
            or checksum(weight) != residual.merged_checksum:
        subtract(weight, delta)
        return False
    _restore(weight, delta, residual, stop=weight.numel())
    return checksum(weight) == residual.checksum


def checksum(weight: Tensor) -> int:
    """The sum of the weight's bits as integers: equal for bit-identical weights."""
    flat = _flat_weight(weight).view(BITS[weight.dtype])
    return sum(bit_sum(flat[s:s + CHUNK]) for s in range(0, flat.numel(), CHUNK)) % 2**32


def bit_sum(bits: Tensor) -> int:
    """The sum of integers modulo 2³²: cheap, equal for equal bits, and the same whatever
    the chunks (a wrapping sum is exact modulo 2³²)."""
    wide = torch.int64 if bits.dtype == torch.int64 else torch.int32
    return int(bits.sum(dtype=wide)) % 2**32


@torch.no_grad()
def subtract(weight: Tensor, delta: Tensor, stop: int | None = None) -> None:
    """``weight ← fl(weight − delta)`` over the flat prefix ``[:stop]`` (default: all)."""
    w, d = _flat(weight, delta)
    stop = w.numel() if stop is None else stop
    size = min(CHUNK, stop)
    wide = None if d.dtype == w.dtype else torch.empty(size, dtype=d.dtype, device=w.device)
    for start in range(0, stop, CHUNK):
        end = min(start + CHUNK, stop)
        _rounded(torch.sub, w[start:end], d[start:end], w[start:end], wide)  # in place


def _restore(weight: Tensor, delta: Tensor, residual: Residual, stop: int) -> None:
    """``weight[:stop] ← fl(weight − delta) + residual``: the flat prefix as before fold."""
    subtract(weight, delta, stop)
    flat = _flat_weight(weight).view(BITS[weight.dtype])
    device = weight.device
    if residual.dense is not None:
        flat[:stop].add_(residual.dense[:stop].to(device))
    for index, values in residual.parts(device):
        keep = index < stop
        flat.index_put_((index[keep].long(),), values[keep].to(flat.dtype), accumulate=True)
