"""B's bias (PEFT's ``lora_bias``): y = base(x) + s·(B A x + b_B), merged into the base bias."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, conv_cases, linear_cases
from test_files import assert_unchanged, snapshot
from torch import nn

import loraplug as lp
from loraplug._folds import push


def with_bias(case: Case) -> Case:
    if case.base.bias is None:
        case.base.bias = nn.Parameter(torch.randn(case.base.weight.shape[0],
                                                  dtype=case.base.weight.dtype))
    return case


@given(case=st.one_of(linear_cases(torch.float64), conv_cases(dtype=torch.float64)))
def test_bias_on_b_against_the_reference(case: Case) -> None:
    case = with_bias(case)
    case.model.eval()  # merged layers compute in evaluation mode
    base = copy.deepcopy(case.base)
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, lora_bias=True)
    layer = case.model[0]
    bias = layer.lora_B_bias["default"]
    assert torch.equal(case.model(case.x), base(case.x))  # a fresh bias is zero
    with torch.no_grad():
        for p in (layer.lora_A["default"], layer.lora_B["default"], bias):
            p.copy_(torch.randn_like(p))
    s = layer.scaling["default"]
    weight = base.weight.detach() + delta(case.kind, layer.lora_A["default"],
                                          layer.lora_B["default"], s, case.groups)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.bias.add_(s * bias)
    expected = dense_forward(reference, weight, case.x)
    assert_close(case.model(case.x), expected)
    with torch.no_grad():  # convolutions may compute through W + ΔW here: the bias too
        assert_close(case.model(case.x), expected)
    lp.merge(case.model)
    assert_close(layer.bias, reference.bias)
    assert_close(case.model(case.x), expected)
    lp.unmerge(case.model)
    assert_close(layer.bias, base.bias)
    assert_close(case.model(case.x), expected)


def test_merging_without_a_base_bias_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    lp.inject_lora(model, target="0", rank=2, lora_bias=True)
    with torch.no_grad():
        model[0].lora_B_bias["default"].fill_(1.0)
    x = torch.randn(2, 4)
    before, y = snapshot(model), model(x)
    with pytest.raises(lp.StateError, match=r"adapters \['default'\] have a bias on B "
                                            r"\(lora_bias\), which merges into the base layer's "
                                            r"bias, and this layer has none"):
        lp.merge(model)
    assert_unchanged(model, before)
    assert torch.equal(model(x), y)  # unmerged, it computes as ever


class Doubled(nn.Linear):
    """A Linear subclass with its own forward: its adapter goes through W + ΔW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(4, 3, bias=False),
    lambda: Doubled(4, 3, bias=False),
    lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False),  # through W + ΔW
], ids=["linear", "linear-subclass", "depthwise"])
def test_a_bias_on_b_counts_where_the_base_has_none(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    base = make().double()
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject_lora(model, target="0", rank=2, lora_bias=True)
    layer = model[0]
    with torch.no_grad():
        for p in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_B_bias["default"]):
            p.copy_(torch.randn_like(p))
    conv = isinstance(base, nn.Conv2d)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64) if conv else torch.randn(2, 4).double()
    s = layer.scaling["default"]
    weight = base.weight.detach() + delta("conv" if conv else "linear", layer.lora_A["default"],
                                          layer.lora_B["default"], s, base.groups if conv else 1)
    reference = copy.deepcopy(base)
    reference.bias = nn.Parameter(s * layer.lora_B_bias["default"].detach())
    expected = dense_forward(reference, weight, x) * (2 if isinstance(base, Doubled) else 1)
    assert_close(model(x), expected)
    with torch.no_grad():
        assert_close(model(x), expected)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"target": "0", "rank": 2, "lora_bias": True, "dora": True}, lp.ConfigError,
     r"dora=True and lora_bias=True cannot be combined"),
    ({"target": "1", "rank": 2, "lora_bias": True}, lp.ConfigError,
     r"'1' \(nn.Embedding\): lora_bias adds a bias to B's output channels"),
    ({"target": "0", "rank": 2, "lora_bias": 1}, lp.ConfigError,
     r"lora_bias must be True or False; received 1"),
])
def test_unusable_bias_options_are_refused(kwargs: dict, error: type, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Embedding(5, 3))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lp.inject_lora(model, **kwargs)
    assert_unchanged(model, before)


def test_a_layer_refuses_to_merge_a_bias_it_cannot_hold() -> None:
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    lp.inject_lora(model, target="0", rank=2, lora_bias=True)
    layer = model[0]
    with pytest.raises(lp.StateError, match=r"this layer has none; keep them unmerged"):
        layer.merge()
    with pytest.raises(lp.StateError, match=r"adapters \['default'\] have a bias on B"):
        push(layer, ("default",))  # the low-level step checks too
