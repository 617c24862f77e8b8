"""fold / unfold: adding ΔW to a weight and taking it out again, bit for bit.

The weights include the hard cases: zeros of both signs, subnormals, values near the
dtype's largest, and ΔW entries far larger than W's (everything W had is then lost to
rounding and must come back from the residual).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loraplug import _exact
from loraplug._exact import BITS, NotFinite, fold, unfold

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype]).clone()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4096 entries, so that weights here span several."""
    monkeypatch.setattr(_exact, "CHUNK", 4096)


@st.composite
def weights(draw: st.DrawFn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A weight with hard entries and a few ΔW of scales from tiny to dominant."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 3 * 4096))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(n, generator=gen, dtype=torch.float64) * 0.02
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, info.tiny, -info.tiny / 4, info.max / 4, -1.0],
                            dtype=torch.float64)
    picks = torch.randint(0, n, (min(n, 6),), generator=gen)
    w[picks] = specials[:picks.numel()]
    deltas = []
    for _ in range(draw(st.integers(1, 3))):
        scale = 10.0 ** draw(st.integers(-8, 1))
        deltas.append((torch.randn(n, generator=gen, dtype=torch.float64) * scale)
                      .to(compute(dtype)))
    return w.to(dtype), deltas


@given(weights(), st.data())
def test_any_order_of_folds_and_unfolds_gives_w_back_bit_for_bit(case, data) -> None:  # type: ignore[no-untyped-def]
    weight, deltas = case
    original = bits(weight)
    states = [original]  # bits after each fold still applied
    stack = []
    for step in data.draw(st.lists(st.integers(0, len(deltas) - 1), max_size=8)):
        if stack and data.draw(st.booleans()):
            delta, residual = stack.pop()
            assert unfold(weight, delta, residual)
            states.pop()
            assert torch.equal(bits(weight), states[-1])
            continue
        try:
            stack.append((deltas[step], fold(weight, deltas[step])))
        except NotFinite:  # an overflow of W near the largest value: refused, W intact
            assert torch.equal(bits(weight), states[-1])
            continue
        states.append(bits(weight))
    while stack:
        delta, residual = stack.pop()
        assert unfold(weight, delta, residual)
    assert torch.equal(bits(weight), original)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "overflow"])
@pytest.mark.parametrize("where", [0, 3 * 4096 + 5])  # the first chunk, or a later one
def test_a_non_finite_sum_is_refused_with_w_untouched(dtype, bad, where) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(4 * 4096, generator=gen) * 0.02).to(dtype)
    delta = (torch.randn(4 * 4096, generator=gen) * 0.5).to(compute(dtype))
    if bad == "overflow":
        weight[where] = torch.finfo(dtype).max
        delta[where] = torch.finfo(dtype).max
    else:
        delta[where] = bad
    before = bits(weight)
    with pytest.raises(NotFinite):
        fold(weight, delta)
    assert torch.equal(bits(weight), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_residual_is_small_when_delta_is_small_and_at_most_the_lost_bits(dtype) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 256, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
    small = (torch.randn(16, 256, generator=gen) * 0.01)
    tiny = (small.t() @ small * 0.01).to(compute(dtype))
    residual = fold(weight, tiny)
    assert residual.dense is None
    assert residual.nbytes <= 0.1 * weight.numel() * weight.element_size()
    huge = torch.randn(256, 256, generator=gen, dtype=torch.float64).to(compute(dtype))
    residual = fold(weight, huge)
    assert residual.dense is not None
    assert residual.nbytes <= 1.2 * weight.numel() * weight.element_size()


def test_a_weight_written_while_folded_is_unfolded_plainly_and_says_so() -> None:
    weight = torch.randn(100) * 0.02
    delta = torch.randn(100)
    residual = fold(weight, delta)
    weight[3] += 1.0
    expected = weight - delta
    assert not unfold(weight, delta, residual)
    assert torch.equal(weight, expected)


def test_a_weight_moved_and_back_is_still_unfolded_exactly() -> None:
    weight = torch.nn.Parameter(torch.randn(100) * 0.02, requires_grad=False)
    original = weight.clone()
    delta = torch.randn(100)
    residual = fold(weight, delta)
    moved = weight.double().float()  # another tensor with the same bits
    assert unfold(moved, delta, residual) and torch.equal(moved, original)


def test_a_different_delta_fails_the_checksum() -> None:
    weight = torch.randn(100) * 0.02
    delta = torch.randn(100)
    residual = fold(weight, delta)
    assert not unfold(weight, delta * (1 + 1e-6), residual)


def test_chunks_are_small(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunking changes nothing but the size of the temporaries.
    weight = torch.randn(1000) * 0.02
    delta = torch.randn(1000)
    monkeypatch.setattr(_exact, "CHUNK", 7)
    other = weight.clone()
    residual = fold(other, delta)
    monkeypatch.undo()
    plain = weight.clone()
    fold(plain, delta)
    assert torch.equal(other, plain)
    assert unfold(other, delta, residual) and torch.equal(other, weight)
