"""Merging by name in any order; unmerge gives W back bit for bit; no merge destroys W.

Adapters here have entries of std 0.5 (``randomize_adapters``), so ΔW dwarfs W and a
plain merge/unmerge round trip changes most of W's entries: only the residual brings
them back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, any_case, randomize_adapters
from torch import nn

import loraplug as lp

NAMES = ("a", "b", "c")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def three_adapters(case: Case) -> lp.LoRALayer:
    for i, name in enumerate(NAMES):
        lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha * (i + 1),
                       name=name)
    randomize_adapters(case.model, seed=case.rank)
    lp.set_adapter(case.model, list(NAMES[:2]))
    return case.model[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def merged_afresh(original: nn.Module, groups: list[tuple[str, ...]]) -> torch.Tensor:
    """The weight after merging each group of names, in order, into a fresh copy, as bits."""
    fresh = copy.deepcopy(original)
    for names in groups:
        lp.merge(fresh, list(names))
    return bits(fresh[0].weight).clone()


OPS = st.lists(st.tuples(st.sampled_from(["merge", "unmerge", "disable"]),
                         st.one_of(st.none(), st.sampled_from(NAMES),
                                   st.lists(st.sampled_from(NAMES), min_size=1, max_size=3))),
               min_size=1, max_size=10)


@given(st.sampled_from(DTYPES).flatmap(any_case), OPS)
def test_merge_unmerge_in_any_order_gives_w_back_bit_for_bit(case: Case, ops) -> None:  # type: ignore[no-untyped-def]
    layer = three_adapters(case)
    original = bits(layer.weight).clone()
    start = copy.deepcopy(case.model)
    for op, names in ops:
        if op == "merge":
            lp.merge(case.model, names)
        elif op == "unmerge":
            lp.unmerge(case.model, names)
        else:
            merged = bits(layer.weight).clone()
            with lp.disable_adapters(case.model):
                assert torch.equal(bits(layer.weight), original)
            assert torch.equal(bits(layer.weight), merged)
        # The weight is what merging the merged adapters alone, in order, gives.
        groups = [f.names for f in layer._folds]
        assert torch.equal(bits(layer.weight), merged_afresh(start, groups))
    lp.unmerge(case.model)
    assert torch.equal(bits(layer.weight), original)


@given(st.sampled_from(DTYPES).flatmap(any_case), st.sampled_from(NAMES),
       st.sampled_from(NAMES))
def test_partly_merged_computes_what_unmerged_does(case: Case, first: str, second: str) -> None:
    layer = three_adapters(case)
    base = copy.deepcopy(layer.base_layer).double()
    lp.merge(case.model, [first])
    lp.merge(case.model, second)
    acting = set(layer.merged_adapters) | set(layer._live)
    assert acting == {first, second} | {"a", "b"}
    weight = base.weight + sum(delta(case.kind, layer.lora_A[n], layer.lora_B[n],
                                     layer.scaling[n], case.groups) for n in acting)
    x = case.x if case.kind == "embedding" else case.x.double()
    ref = dense_forward(base, weight, x)
    with torch.no_grad():
        assert_close(case.model(case.x), ref, layer.weight.dtype,
                     scale=max(1.0, ref.abs().max().item()))


def poisoned_pair(dtype: torch.dtype, poison: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)).to(dtype)
    lp.inject_lora(model, target=["0", "1"], rank=2, name="good")
    lp.inject_lora(model, target=["0", "1"], rank=2, name="bad")
    randomize_adapters(model)
    with torch.no_grad():
        b = model[1].lora_B["bad"]
        if poison == "overflow":  # finite adapters whose ΔW leaves the dtype's range
            big = torch.finfo(dtype).max ** 0.5
            model[1].lora_A["bad"].fill_(big)
            b.fill_(big)
        else:
            b[0, 0] = float(poison)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["nan", "inf", "overflow"])
def test_a_non_finite_merge_leaves_every_weight_bit_identical(dtype, poison) -> None:  # type: ignore[no-untyped-def]
    model = poisoned_pair(dtype, poison)
    lp.merge(model, "good")
    before = [bits(m.weight).clone() for m in model]
    with pytest.raises(lp.StateError, match=r"merge: '1': merging \['bad'\] gives a weight with "
                                            r"NaN or inf values.* No layer was changed"):
        lp.merge(model, "bad")
    assert [m.merged_adapters for m in model] == [("good",), ("good",)]
    assert all(torch.equal(bits(m.weight), w) for m, w in zip(model, before))
    with pytest.raises(lp.StateError, match=r"gives a weight with NaN or inf values"):
        model[1].merge(["bad"])
    assert torch.equal(bits(model[1].weight), before[1])


def test_unmerging_what_lies_under_a_sum_that_overflows_alone_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).half()
    lp.inject_lora(model, target="0", rank=1, name="up")
    lp.inject_lora(model, target="0", rank=1, name="down")
    with torch.no_grad():
        for name, sign in (("up", 1.0), ("down", -1.0)):
            model[0].lora_A[name].fill_(300.0)
            model[0].lora_B[name].fill_(sign * 300.0)  # ±90000: beyond float16 alone
    lp.merge(model, ["up", "down"])  # one fold: the sum cancels
    merged = bits(model[0].weight).clone()
    with pytest.raises(lp.StateError, match=r"unmerge: '0': merging \['down'\] gives a weight "
                                            r"with NaN or inf"):
        lp.unmerge(model, "up")
    assert model[0].merged_adapters == ("up", "down")
    assert torch.equal(bits(model[0].weight), merged)


def test_peft_order_of_merges_by_name_and_its_refusals() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).eval()  # merged inference
    for name in ("a", "adapter-2"):
        lp.inject_lora(model, target="0", rank=2, name=name)
    randomize_adapters(model)
    lp.set_adapter(model, ["a", "adapter-2"])
    x = torch.randn(3, 6)
    both = model(x)
    lp.merge(model, ["a"])
    lp.merge(model, ["adapter-2"])
    assert model[0].merged_adapters == ("a", "adapter-2")
    assert_close(model(x), both)
    lp.merge(model)  # nothing left to merge: a no-op
    model[0].unmerge("adapter-2")  # a name, not its letters
    assert model[0].merged_adapters == ("a",)
    model[0].merge("adapter-2")
    with pytest.raises(lp.AdapterError, match=r"merge: unknown adapter name\(s\) \['z'\]"):
        lp.merge(model, "z")
    with pytest.raises(lp.AdapterError, match=r"unmerge: expected an adapter name, a list of "
                                              r"names or None; received 3"):
        lp.unmerge(model, 3)  # type: ignore[arg-type]


def test_a_weight_written_while_merged_is_unmerged_plainly_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    lp.merge(model)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
        expected = model[0].weight - model[0].delta_weight("default")
    with pytest.warns(lp.LoRAWarning, match=r"unmerging \['default'\] did not give the weight "
                                            r"back bit for bit"):
        lp.unmerge(model)
    assert torch.equal(model[0].weight, expected)


def test_inexact_merges_keep_no_residual_and_unmerge_to_within_rounding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    lp.inject_lora(model, target="0", rank=4)
    randomize_adapters(model)
    original = model[0].weight.clone()
    lp.merge(model, exact=False)
    assert model[0]._folds[-1].residual is None
    lp.unmerge(model)
    assert not torch.equal(model[0].weight, original)  # std 0.5 adapters: rounding shows
    torch.testing.assert_close(model[0].weight, original, rtol=0, atol=1e-5)
    lp.merge(model)
    assert model[0]._folds[-1].residual is not None


def test_compiled_forward_of_a_partly_merged_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    for name in NAMES:
        lp.inject_lora(model, target="0", rank=2, name=name)
    randomize_adapters(model)
    lp.set_adapter(model, ["a", "b"])
    x = torch.randn(3, 6)
    expected = model(x)
    lp.merge(model, "a")
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert_close(compiled(x), expected)
    assert_close(compiled(x), expected)


def test_a_channels_last_weight_merges_and_unmerges_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3)).to(memory_format=torch.channels_last).eval()
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    x = torch.randn(2, 4, 8, 8)
    expected, original = model(x), model[0].weight.clone()
    lp.merge(model)
    assert not model[0].weight.is_contiguous()  # still channels_last, written through
    assert_close(model(x), expected)
    lp.unmerge(model)
    assert torch.equal(bits(model[0].weight), bits(original))
    lp.merge(model)
    model[0].weight.data = model[0].weight.data.contiguous()  # another layout while merged
    with pytest.warns(lp.LoRAWarning, match="did not give the weight back bit for bit"):
        lp.unmerge(model)
    torch.testing.assert_close(model[0].weight, original)


@given(st.sampled_from(DTYPES).flatmap(any_case),
       st.sampled_from(["nan", "inf", "-inf", "overflow"]), st.sampled_from(["A", "B"]),
       st.integers(0, 2**16))
def test_a_poisoned_adapter_never_changes_w(case: Case, poison: str, side: str,
                                            seed: int) -> None:
    layer = three_adapters(case)
    lp.merge(case.model, "a")  # something merged already: it must stay exactly as it is
    before = bits(layer.weight).clone()
    with torch.no_grad():
        if poison == "overflow":  # finite factors whose product leaves the dtype's range
            big = 2 * torch.finfo(layer.weight.dtype).max ** 0.5
            layer.lora_A["c"].fill_(big)
            layer.lora_B["c"].fill_(big)
        else:
            tensor = (layer.lora_A if side == "A" else layer.lora_B)["c"]
            flat = tensor.view(-1)
            flat[torch.randint(0, flat.numel(), (1,), generator=torch.Generator().manual_seed(
                seed))] = float(poison)
    with pytest.raises(lp.StateError, match=r"merging \['c'\] gives a weight with NaN or inf"):
        lp.merge(case.model, "c")
    assert layer.merged_adapters == ("a",)
    assert torch.equal(bits(layer.weight), before)


def test_unload_with_merge_of_a_poisoned_adapter_changes_nothing() -> None:
    model = poisoned_pair(torch.float32, "nan")
    lp.set_adapter(model, ["good", "bad"])
    before = [bits(m.weight).clone() for m in model]
    with pytest.raises(lp.StateError, match=r"merge: '1': merging \['good', 'bad'\] gives"):
        lp.unload(model, merge=True)
    assert all(isinstance(m, lp.LoRALayer) and not m.merged for m in model)
    assert all(torch.equal(bits(m.weight), w) for m, w in zip(model, before))
