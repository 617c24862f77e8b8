"""combine_adapters against the dense reference, on every layer type; its errors.

PEFT is the oracle for the numbers of every method (test_combine_peft.py) on the layers
it supports; here the exact methods are checked on every layer type, grouped and 1-D/3-D
convolutions included, against ΔW built in float64 from the raw tensors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, any_case, randomize_adapters
from test_inject import assert_same, snapshot
from torch import nn

import loraplug as lp

WEIGHT = st.sampled_from([0.7, -0.4, 1.5, 0.0])


def two_adapters(case: Case) -> lp.LoRALayer:
    """Adapters 'a' (alpha of the case) and 'b' (alpha 3) of the case's rank, random."""
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, name="a")
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=3.0, name="b")
    randomize_adapters(case.model, seed=case.rank)
    return case.model[0]


def ref_delta(case: Case, layer: lp.LoRALayer, name: str) -> torch.Tensor:
    return delta(case.kind, layer.lora_A[name], layer.lora_B[name], layer.scaling[name],
                 case.groups)


def weighted_sum(case: Case, layer: lp.LoRALayer, weights: dict[str, float]) -> torch.Tensor:
    return sum(w * ref_delta(case, layer, n) for n, w in weights.items())  # type: ignore[return-value]


def scale_of(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item())


def assert_forward_is_dense(case: Case, layer: lp.LoRALayer, name: str) -> None:
    base = copy.deepcopy(layer.base_layer).double()
    weight = base.weight + ref_delta(case, layer, name)
    x = case.x if case.kind == "embedding" else case.x.double()
    ref = dense_forward(base, weight, x)
    lp.set_adapter(case.model, name)
    with torch.no_grad():
        assert_close(case.model(case.x), ref, layer.weight.dtype, scale=scale_of(ref))


@given(any_case(), WEIGHT, WEIGHT)
def test_cat_is_exactly_the_weighted_sum_on_every_layer_type(case: Case, wa: float,
                                                             wb: float) -> None:
    layer = two_adapters(case)
    lp.combine_adapters(case.model, {"a": wa, "b": wb}, "mix", method="cat")
    assert layer.rank["mix"] == 2 * case.rank and layer.scaling["mix"] == 1.0
    expected = weighted_sum(case, layer, {"a": wa, "b": wb})
    assert_close(ref_delta(case, layer, "mix"), expected, layer.weight.dtype,
                 scale=scale_of(expected))
    assert_forward_is_dense(case, layer, "mix")


@given(any_case(dtype=torch.float64), WEIGHT, WEIGHT)
def test_svd_at_the_summed_rank_is_exactly_the_weighted_sum(case: Case, wa: float,
                                                            wb: float) -> None:
    layer = two_adapters(case)
    lp.combine_adapters(case.model, {"a": wa, "b": wb}, "mix", method="svd",
                        rank=2 * case.rank)
    expected = weighted_sum(case, layer, {"a": wa, "b": wb})
    assert_close(ref_delta(case, layer, "mix"), expected, torch.float64,
                 scale=scale_of(expected))
    assert_forward_is_dense(case, layer, "mix")


def blocks(case: Case, layer: lp.LoRALayer, d: torch.Tensor) -> torch.Tensor:
    """ΔW as the matrix the rank applies to (obvious version): for a convolution, of any
    groups, its matrix view (out, in/g·k…), A being shared by the groups."""
    if case.kind == "embedding":
        return d.t()[None]
    return d.reshape(1, d.shape[0], -1)


@given(any_case(dtype=torch.float64), st.integers(1, 3))
def test_svd_keeps_the_best_rank_k_approximation(case: Case, k: int) -> None:
    # Eckart–Young: the error of the best rank-k factors is the norm of the other
    # singular values (over a convolution's matrix view, whatever its groups).
    layer = two_adapters(case)
    lp.combine_adapters(case.model, {"a": 1.0, "b": 0.5}, "mix", method="svd", rank=k)
    exact = blocks(case, layer, weighted_sum(case, layer, {"a": 1.0, "b": 0.5}))
    kept = min(k, layer.max_rank())
    assert layer.rank["mix"] == kept
    lost = torch.linalg.svdvals(exact)[..., kept:].square().sum().sqrt()
    error = torch.linalg.matrix_norm(blocks(case, layer, ref_delta(case, layer, "mix")) - exact)
    assert math.isclose(error.square().sum().sqrt().item(), lost.item(),
                        rel_tol=1e-6, abs_tol=1e-9)


@given(any_case(), WEIGHT, WEIGHT)
def test_linear_mixes_a_and_b_separately_with_signed_roots(case: Case, wa: float,
                                                           wb: float) -> None:
    layer = two_adapters(case)
    lp.combine_adapters(case.model, {"a": wa, "b": wb}, "mix", method="linear")
    a = b = 0
    for n, w in (("a", wa), ("b", wb)):
        root = math.sqrt(abs(w * layer.scaling[n]))
        a = a + math.copysign(root, w * layer.scaling[n]) * layer.lora_A[n].double()
        b = b + root * layer.lora_B[n].double()
    expected = delta(case.kind, a, b, 1.0, case.groups)  # type: ignore[arg-type]
    assert_close(ref_delta(case, layer, "mix"), expected, layer.weight.dtype,
                 scale=scale_of(expected))


@given(any_case(dtype=torch.float32), st.sampled_from(["dare_linear", "magnitude_prune"]))
def test_pruning_at_density_one_is_linear(case: Case, method: str) -> None:
    layer = two_adapters(case)
    lp.combine_adapters(case.model, {"a": 0.7, "b": 0.3}, "lin", method="linear")
    lp.combine_adapters(case.model, {"a": 0.7, "b": 0.3}, "mix", method=method, density=1.0)
    assert torch.equal(layer.lora_A["mix"], layer.lora_A["lin"])
    assert torch.equal(layer.lora_B["mix"], layer.lora_B["lin"])


# ------------------------------------------------------------- an adapter like any other
def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    lp.inject_lora(model, target=["0", "1"], rank=2, alpha=4, name="a")
    lp.inject_lora(model, target=["1", "3"], rank=2, name="b")
    randomize_adapters(model)
    return model


IDS = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))


def test_combined_adapter_is_inactive_saved_merged_and_deleted_like_any(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = net()
    assert lp.combine_adapters(model, {"a": 0.5, "b": 2.0}, "a-b mix", method="cat") == \
        ["0", "1", "3"]
    assert lp.active_adapters(model) == ["a"] and model[3].rank["a-b mix"] == 2
    assert all(p.requires_grad for n, p in model.named_parameters() if "a-b mix" in n)
    lp.set_adapter(model, "a-b mix")
    expected = model(IDS)
    lp.save_adapter(model, tmp_path, name="a-b mix")
    loaded = net()
    lp.load_adapter(loaded, tmp_path, name="a-b mix")
    lp.set_adapter(loaded, "a-b mix")
    torch.testing.assert_close(loaded(IDS), expected)
    lp.merge(model)
    with torch.no_grad():  # merged inference
        torch.testing.assert_close(model(IDS), expected)
    lp.unmerge(model)
    lp.set_adapter(model, "a")
    lp.delete_adapter(model, "a-b mix")
    assert lp.adapter_names(model) == ["a", "b"]


def test_dare_masks_come_from_the_generator() -> None:
    results = []
    for seed in (0, 0, 1):
        model = net()
        lp.combine_adapters(model, {"a": 1.0, "b": 1.0}, "m", method="dare_ties",
                            density=0.5, generator=torch.Generator().manual_seed(seed))
        results.append(model[1].lora_A["m"])
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_combining_while_merged_leaves_the_weights_alone() -> None:
    model = net()
    lp.merge(model)
    before = model[1].weight.clone()
    lp.combine_adapters(model, {"a": 1.0}, "same", method="linear")
    assert torch.equal(model[1].weight, before)
    torch.testing.assert_close(model[1].delta_weight("same"), model[1].delta_weight("a"))


# --------------------------------------------------------------------------- errors
class Odd(nn.Linear):
    """A Linear whose LoRA layer does not say how its ΔW factors."""


@lp.register_lora_layer(Odd)
class LoRAOdd(lp.LoRALinear):
    def delta_blocks(self, delta: torch.Tensor) -> None:
        return None


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    (([("a", 1.0)], "m"), {"method": "cat"}, lp.ConfigError,
     r"weights must be a non-empty mapping adapter name -> finite number; received \["),
    (({}, "m"), {"method": "cat"}, lp.ConfigError, r"non-empty mapping .*received \{\}"),
    (({"a": True}, "m"), {"method": "cat"}, lp.ConfigError, r"finite number; received"),
    (({"a": float("nan")}, "m"), {"method": "cat"}, lp.ConfigError, r"finite number"),
    (({"a": 1.0}, "m.n"), {"method": "cat"}, lp.ConfigError, r"adapter name must be"),
    (({"a": 1.0, "bb": 1.0}, "m"), {"method": "cat"}, lp.AdapterError,
     r"combine_adapters: unknown adapter name\(s\) \['bb'\].*Did you mean \['b'\]"),
    (({"a": 1.0}, "b"), {"method": "cat"}, lp.ConfigError,
     r"\['1', '3'\] already have an adapter named 'b'; choose another name"),
    (({"a": 1.0}, "m"), {"method": "ties_sdv"}, lp.ConfigError,
     r"unknown method 'ties_sdv'; expected one of .* Did you mean 'ties_svd'\?"),
    (({"a": 1.0}, "m"), {"method": "cat", "density": 0.5}, lp.ConfigError,
     r"method 'cat' does not use \['density'\]"),
    (({"a": 1.0}, "m"), {"method": "ties", "density": 0.5, "rank": 2}, lp.ConfigError,
     r"method 'ties' does not use \['rank'\]"),
    (({"a": 1.0}, "m"), {"method": "svd", "majority_sign": "total"}, lp.ConfigError,
     r"does not use \['majority_sign'\]"),
    (({"a": 1.0}, "m"), {"method": "ties"}, lp.ConfigError,
     r"method 'ties' needs density, the fraction of entries kept, in \[0, 1\]; received None"),
    (({"a": 1.0}, "m"), {"method": "dare_linear", "density": 0.0}, lp.ConfigError,
     r"needs density, .* in \(0, 1\]; received 0.0"),
    (({"a": 1.0}, "m"), {"method": "magnitude_prune", "density": 1.5}, lp.ConfigError,
     r"received 1.5"),
    (({"a": 1.0}, "m"), {"method": "ties", "density": 0.5, "majority_sign": "most"},
     lp.ConfigError, r"majority_sign must be 'total' or 'frequency'; received 'most'"),
    (({"a": 1.0}, "m"), {"method": "svd", "rank": 0}, lp.ConfigError,
     r"rank must be a positive int or None .*received 0"),
    (({"a": 1.0}, "m"), {"method": "svd", "svd_clamp": 1.5}, lp.ConfigError,
     r"svd_clamp must be a quantile in \[0, 1\] or None; received 1.5"),
    (({"a": 1.0}, "m"), {"method": "svd", "svd_driver": "lapack"}, lp.ConfigError,
     r"svd_driver must be one of \[None, 'gesvd', 'gesvdj', 'gesvda'\]"),
    (({"a": 1.0}, "m"), {"method": "svd", "svd_full_matrices": 1}, lp.ConfigError,
     r"svd_full_matrices a bool; received None, 1"),
    (({"a": 1.0}, "m"), {"method": "dare_ties", "density": 0.5, "generator": 3},
     lp.ConfigError, r"generator must be a torch.Generator or None; received 3"),
])
def test_bad_arguments_are_refused_and_nothing_changes(args, kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    model = net()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lp.combine_adapters(model, *args, **kwargs)
    assert_same(before, snapshot(model))


def test_entry_by_entry_methods_need_equal_ranks() -> None:
    model = net()
    lp.inject_lora(model, target="1", rank=4, name="wide")
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=r"nothing was changed:\n'1': ranks \{'a': 2, "
                                             r"'wide': 4\} differ, and method 'ties' mixes A"):
        lp.combine_adapters(model, {"a": 1.0, "wide": 1.0}, "m", method="ties", density=0.5)
    assert_same(before, snapshot(model))
    lp.combine_adapters(model, {"a": 1.0, "wide": 1.0}, "m", method="cat")
    assert model[1].rank["m"] == 6


def test_layer_types_without_products_refuse_cat_and_svd() -> None:
    model = nn.Sequential(Odd(4, 4))
    lp.inject_lora(model, target="0", rank=2, name="a")
    lp.inject_lora(model, target="0", rank=2, name="b")
    with pytest.raises(lp.ConfigError, match=r"'0' \(LoRAOdd\): its ΔW is not a product B A "
                                             r"that method 'svd' can concatenate or refactor"):
        lp.combine_adapters(model, {"a": 1.0, "b": 1.0}, "m", method="svd")
    lp.combine_adapters(model, {"a": 1.0, "b": 1.0}, "m", method="linear")


def test_peft_grouped_layout_refuses_cat_and_svd() -> None:
    # PEFT's A of a grouped convolution reads every input channel: no product B A over the
    # weight's matrix view. Loaded from a state dict into an adapter of that layout.
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    lp.inject_lora(model, target="0", rank=2, name="a")
    lp.inject_lora(model, target="0", rank=2, name="b")
    layer = model[0]
    layer.load_tensors("b", torch.randn(2, 4, 3, 3), torch.randn(4, 1, 1, 1))
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=r"adapters \['b'\] are in another layout than "
                                             r"its own \(PEFT's for a grouped convolution\)"):
        lp.combine_adapters(model, {"a": 1.0, "b": 1.0}, "m", method="cat")
    assert_same(before, snapshot(model))


def test_a_model_without_lora_layers_is_refused() -> None:
    with pytest.raises(lp.StateError, match=r"combine_adapters: the model \(Linear\) has no "
                                            r"LoRA layers"):
        lp.combine_adapters(nn.Linear(2, 2), {"a": 1.0}, "m", method="cat")
