"""Properties of every registered layer type against the dense reference in reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, any_case, conv_cases, embedding_cases, linear_cases, randomize_adapters
from torch import nn

import loraplug as lp


def _inject(case: Case, **kwargs) -> lp.LoRALayer:
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, **kwargs)
    return case.model[0]


def _reference(case: Case, base: nn.Module, names: list[str]) -> torch.Tensor:
    """The adapted output in float64, computed with F.* on W + Σ ΔW."""
    layer = case.model[0]
    weight = base.weight.double()
    for n in names:
        weight = weight + delta(case.kind, layer.lora_A[n], layer.lora_B[n],
                                layer.alpha[n] / layer.rank[n], case.groups)
    base64 = copy.deepcopy(base).double()
    x = case.x if case.kind == "embedding" else case.x.double()
    return dense_forward(base64, weight, x)


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def pinned_conv() -> Case:
    """Conv2d 1→1, kernel 3, padding 2, dilation 2, reflect: the case other libraries get wrong."""
    torch.manual_seed(0)
    return Case(
        "conv",
        nn.Sequential(nn.Conv2d(1, 1, 3, padding=2, dilation=2, padding_mode="reflect")),
        torch.randn(1, 1, 6, 6),
        rank=1,
        alpha=1.0,
    )


@given(any_case())
@example(pinned_conv())
def test_fresh_injection_is_bit_identical_to_base(case: Case) -> None:
    base = copy.deepcopy(case.base)
    expected = base(case.x)
    _inject(case)
    assert torch.equal(case.model(case.x), expected)


def depthwise_conv() -> Case:
    """Depthwise Conv2d (groups = channels = 6) at rank 4, which no grouping divides."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    return Case("conv", nn.Sequential(conv), torch.randn(2, 6, 5, 5), rank=4, alpha=8.0,
                groups=6)


def pointwise_conv() -> Case:
    """A 1×1 Conv2d with unit stride and no padding on few positions (a squeeze-excite
    layer): without gradients its branch is a matmul over channels."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 48, 1, padding="same")
    return Case("conv", nn.Sequential(conv), torch.randn(2, 64, 1, 1), rank=2, alpha=3.0)


@given(any_case(), st.sampled_from(["eval", "train"]))
@example(pinned_conv(), "eval")
@example(depthwise_conv(), "train")
@example(pointwise_conv(), "eval")
def test_unmerged_and_merged_match_dense_reference(case: Case, mode: str) -> None:
    base = copy.deepcopy(case.base)
    layer = _inject(case)
    randomize_adapters(case.model)
    getattr(case.model, mode)()
    ref = _reference(case, base, ["default"])
    unmerged = case.model(case.x)
    assert unmerged.dtype == base.weight.dtype
    assert_close(unmerged, ref, case.base.weight.dtype, scale=_scale(ref))
    with torch.no_grad():  # where nothing is recorded a layer may take another path
        assert_close(case.model(case.x), ref, case.base.weight.dtype, scale=_scale(ref))
    layer.merge()
    assert layer.merged
    with torch.no_grad():  # a merged layer in a training forward warns (it cannot train)
        assert_close(case.model(case.x), ref, case.base.weight.dtype, scale=_scale(ref))


@given(any_case())
def test_merged_forward_is_the_base_computation_on_merged_weight(case: Case) -> None:
    layer = _inject(case)
    randomize_adapters(case.model)
    layer.merge()
    plain = copy.deepcopy(layer.base_layer)
    # The merged layer does no LoRA work: exactly the base module on the same weight.
    with torch.no_grad():
        assert torch.equal(case.model(case.x), plain(case.x))


@given(any_case())
@example(pinned_conv())
def test_unmerge_restores_weight(case: Case) -> None:
    original = case.base.weight.detach().clone()
    layer = _inject(case)
    randomize_adapters(case.model)
    layer.merge()
    assert not torch.equal(layer.weight, original) or layer.weight.dtype == torch.bfloat16
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, original, scale=_scale(original))


@given(any_case())
def test_merge_twice_adds_delta_once(case: Case) -> None:
    original = case.base.weight.detach().clone()
    layer = _inject(case)
    randomize_adapters(case.model)
    lp.merge(case.model)
    once = layer.weight.detach().clone()
    lp.merge(case.model)
    layer.merge()
    assert torch.equal(layer.weight, once)
    lp.unmerge(case.model)
    lp.unmerge(case.model)
    assert not layer.merged
    assert_close(layer.weight, original, scale=_scale(original))


@given(any_case())
def test_merge_computes_delta_in_float32_for_half_weights(case: Case) -> None:
    if case.base.weight.dtype != torch.bfloat16:
        case.model.to(torch.bfloat16)
        case.x = case.x if case.kind == "embedding" else case.x.to(torch.bfloat16)
    w = case.base.weight.detach().clone()
    layer = _inject(case)
    randomize_adapters(case.model)
    d = delta(case.kind, layer.lora_A["default"], layer.lora_B["default"],
              layer.scaling["default"], case.groups)
    expected = (w.double() + d).float().to(torch.bfloat16)  # one rounding from float32
    layer.merge()
    # float32 sum then one cast: within one bf16 ulp of the exactly rounded result.
    torch.testing.assert_close(layer.weight.float(), expected.float(), rtol=2**-7, atol=1e-6)


@given(any_case(), st.integers(0, 2**16))
def test_two_active_adapters_equal_their_merged_sum(case: Case, seed: int) -> None:
    base = copy.deepcopy(case.base)
    layer = _inject(case)
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=2 * case.alpha, name="b")
    randomize_adapters(case.model, seed)
    lp.set_adapter(case.model, ["default", "b"])
    ref = _reference(case, base, ["default", "b"])
    assert_close(case.model(case.x), ref, base.weight.dtype, scale=_scale(ref))
    lp.merge(case.model)
    assert layer.merged_adapters == ("default", "b")
    with torch.no_grad():
        assert_close(case.model(case.x), ref, base.weight.dtype, scale=_scale(ref))


@given(any_case(torch.float32), st.sampled_from(["sgd", "adamw"]))
def test_only_lora_parameters_train(case: Case, optimizer: str) -> None:
    layer = _inject(case, dropout=0.0)
    randomize_adapters(case.model)
    base_before = {k: v.clone() for k, v in case.model.state_dict().items() if "lora" not in k}
    trainable = [p for p in case.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in (*layer.lora_A.values(),
                                                          *layer.lora_B.values())}
    opt = (torch.optim.SGD(trainable, lr=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(trainable, lr=0.1))
    case.model(case.x).float().pow(2).sum().backward()
    assert layer.weight.grad is None
    assert all(p.grad is not None for p in trainable)
    opt.step()
    after = case.model.state_dict()
    for k, v in base_before.items():
        assert torch.equal(after[k], v), k


@given(any_case())
def test_added_parameter_count_matches_formula(case: Case) -> None:
    w = case.base.weight
    r = case.rank
    if case.kind == "linear":
        expected = r * (w.shape[1] + w.shape[0])
    elif case.kind == "embedding":
        expected = r * (w.shape[0] + w.shape[1])
    else:  # A: r · in/g · k… (shared by the groups),  B: out · r
        expected = r * (w[0].numel() + w.shape[0])
    total_before = sum(p.numel() for p in case.model.parameters())
    _inject(case)
    assert sum(p.numel() for p in case.model.parameters()) - total_before == expected
    assert lp.summary(case.model).lora_parameters == expected


@given(st.one_of(linear_cases(torch.float64), conv_cases(dtype=torch.float64)),
       st.sampled_from([0.0, 0.5]))
def test_dropout_applies_to_branch_input_only(case: Case, p: float) -> None:
    """In train mode: output = base(x) + s·B A dropout(x), reproduced with the same RNG state."""
    layer = _inject(case, dropout=p)
    randomize_adapters(case.model)
    case.model.train()
    torch.manual_seed(1)
    out = case.model(case.x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(case.x, p, training=True) if p else case.x
    plain = copy.deepcopy(layer.base_layer)
    branch_weight = delta(case.kind, layer.lora_A["default"], layer.lora_B["default"],
                          layer.scaling["default"], case.groups)
    no_bias = copy.deepcopy(plain)
    no_bias.bias = None
    ref = plain(case.x) + dense_forward(no_bias, branch_weight, dropped)
    assert_close(out, ref, scale=_scale(ref))


def test_dropout_is_off_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    lp.inject_lora(model, target="0", rank=2, dropout=0.9)
    randomize_adapters(model)
    model.eval()
    x = torch.randn(4, 6)
    layer = model[0]
    w = layer.weight + delta("linear", layer.lora_A["default"], layer.lora_B["default"], 1.0)
    assert_close(model(x), torch.nn.functional.linear(x.double(), w, layer.bias.double()))


@given(conv_cases(dtype=torch.float64))
def test_grouped_conv_delta_equals_its_dense_ungrouped_conv(case: Case) -> None:
    """A grouped conv's ΔW acts as the block-diagonal ΔW of the same conv written dense
    (groups=1): within each group B A, across groups zero, so it merges exactly."""
    layer = _inject(case)
    randomize_adapters(case.model)
    g, d = case.groups, layer.delta_weight("default")
    out, per_group = d.shape[:2]
    dense = torch.zeros(out, per_group * g, *d.shape[2:], dtype=d.dtype)
    for o in range(out):
        group = o // (out // g)
        dense[o, group * per_group:(group + 1) * per_group] = d[o]
    grouped = copy.deepcopy(layer.base_layer).double()
    ungrouped = copy.deepcopy(grouped)
    ungrouped.groups, ungrouped.in_channels = 1, per_group * g
    grouped.bias = ungrouped.bias = None
    torch.testing.assert_close(dense_forward(grouped, d, case.x),
                               dense_forward(ungrouped, dense, case.x))


@given(linear_cases(torch.float32))
def test_rslora_scales_by_sqrt_rank(case: Case) -> None:
    layer = _inject(case, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(case.alpha / case.rank**0.5)


@given(embedding_cases(torch.float32))
def test_embedding_padding_idx_row_gets_no_gradient(case: Case) -> None:
    assume(case.base.padding_idx is not None)
    layer = _inject(case)
    randomize_adapters(case.model)
    ids = torch.full((3,), case.base.padding_idx)
    case.model(ids).sum().backward()
    assert torch.count_nonzero(layer.lora_A["default"].grad[:, case.base.padding_idx]) == 0


def test_pinned_reflect_dilation_conv_against_peft_breaking_case() -> None:
    """ΔW-merged, unmerged and reference agree on the pinned reflect/dilation conv."""
    case = pinned_conv()
    base = copy.deepcopy(case.base)
    _inject(case)
    randomize_adapters(case.model)
    ref = _reference(case, base, ["default"])
    assert ref.shape == base(case.x).shape == case.model(case.x).shape
    assert_close(case.model(case.x), ref, scale=_scale(ref))


@given(any_case())
def test_unload_restores_the_object_and_bit_identical_state(case: Case) -> None:
    original = case.base
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    _inject(case)
    randomize_adapters(case.model)
    case.model(case.x)
    lp.unload(case.model)
    assert case.model[0] is original
    after = case.model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


@given(any_case(), st.sampled_from(["rank", "alpha", "dropout", "name", "duplicate", "target"]))
def test_failed_inject_leaves_the_model_unchanged(case: Case, fault: str) -> None:
    case.model.append(nn.Conv1d(4, 4, 1, groups=4))  # a second target, depthwise
    lp.inject_lora(case.model, target="0", rank=case.rank, name="existing")
    randomize_adapters(case.model)
    before = (
        [(n, id(m)) for n, m in case.model.named_modules()],
        {k: v.clone() for k, v in case.model.state_dict().items()},
        [(n, p.requires_grad) for n, p in case.model.named_parameters()],
        case.model[0].active_adapters,
    )
    kwargs = {"target": ["0", "1"], "rank": 4, "name": "new"}
    kwargs.update({
        "rank": {"rank": -1},
        "alpha": {"alpha": -2.0},
        "dropout": {"dropout": 1.5},
        "name": {"name": "no.dots"},
        "duplicate": {"name": "existing"},
        "target": {"target": ["0", "1", "no_such_layer"]},
    }[fault])
    with pytest.raises(lp.LoRAError):
        lp.inject_lora(case.model, **kwargs)
    after = (
        [(n, id(m)) for n, m in case.model.named_modules()],
        case.model.state_dict(),
        [(n, p.requires_grad) for n, p in case.model.named_parameters()],
        case.model[0].active_adapters,
    )
    assert before[0] == after[0] and before[2] == after[2] and before[3] == after[3]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


@given(conv_cases(), st.sampled_from(["eval", "train"]))
@example(depthwise_conv(), "eval")
def test_conv_without_gradients_matches_dense_reference(case: Case, mode: str) -> None:
    """Without gradients a conv may compute through W + ΔW (cheaper): the same function."""
    base = copy.deepcopy(case.base)
    _inject(case)
    randomize_adapters(case.model)
    getattr(case.model, mode)()
    ref = _reference(case, base, ["default"])
    with torch.no_grad():
        out = case.model(case.x)
    assert_close(out, ref, case.base.weight.dtype, scale=_scale(ref))


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 8, 1), nn.Conv2d(6, 8, 3), nn.Conv1d(6, 8, 3)],
                         ids=str)
def test_an_empty_batch_passes_through(conv: nn.Module) -> None:
    model = nn.Sequential(conv)
    lp.inject_lora(model, target="0", rank=2)
    x = torch.randn(0, 6, *([5] * (conv.weight.dim() - 2)))
    expected = conv(x).shape
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert model(x).shape == expected
