"""adapter_per_sample against running each row alone, and the fast forward path's freshness.

The reference for a row is the dense function F.*(x_i, W + ΔW_j) from reference.py (or
the base alone for None); gradients are checked against the plain forward run on the
rows of each adapter separately.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, conv_cases, embedding_cases, linear_cases, randomize_adapters
from torch import nn

import loraplug as lp

NAMES = ("a", "b")


def layer_cases(dtype: torch.dtype | None = None) -> st.SearchStrategy[Case]:
    return st.one_of(linear_cases(dtype), conv_cases(dtype=dtype), embedding_cases(dtype))


def _two_adapters(case: Case, second_rank: int, *, dropout: float = 0.0) -> lp.LoRALayer:
    """Adapters "a" (the case's rank) and "b" (another rank and alpha), non-zero."""
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, name="a",
                   dropout=dropout)
    rank_b = case.groups * second_rank
    with warnings.catch_warnings():  # a rank above what ΔW can have still computes exactly
        warnings.simplefilter("ignore", lp.LoRAWarning)
        lp.inject_lora(case.model, target="0", rank=rank_b, alpha=2.5, name="b",
                       dropout=dropout)
    randomize_adapters(case.model, seed=rank_b)
    return case.model[0]


def _batch(case: Case, rows: int, seed: int) -> torch.Tensor:
    """An input like the case's with ``rows`` rows in the first dimension."""
    x = case.x if case.x.dim() >= 2 or case.kind == "embedding" else case.x.unsqueeze(0)
    shape = (rows, *x.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    if case.kind == "embedding":
        return torch.randint(0, case.base.num_embeddings, shape, generator=gen)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype)


def _row_reference(case: Case, base: nn.Module, layer: lp.LoRALayer, x: torch.Tensor,
                   name: str | None) -> torch.Tensor:
    """One row through W + ΔW_name (or W), in float64, from the raw tensors."""
    weight = base.weight.double()
    if name is not None:
        weight = weight + delta(case.kind, layer.lora_A[name], layer.lora_B[name],
                                layer.scaling[name], case.groups)
    x = x if case.kind == "embedding" else x.double()
    return dense_forward(copy.deepcopy(base).double(), weight, x)


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


names_per_row = st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=4)


@given(layer_cases(), st.integers(1, 2), names_per_row, st.sampled_from(["eval", "train"]),
       st.integers(0, 2**16))
def test_each_row_equals_that_row_alone_with_its_adapter(
    case: Case, second_rank: int, names: list[str | None], mode: str, seed: int
) -> None:
    base = copy.deepcopy(case.base)
    layer = _two_adapters(case, second_rank)
    getattr(case.model, mode)()
    x = _batch(case, len(names), seed)
    with torch.no_grad(), lp.adapter_per_sample(case.model, names):
        out = case.model(x)
    assert out.dtype == base.weight.dtype
    for i, name in enumerate(names):
        ref = _row_reference(case, base, layer, x[i:i + 1], name)
        assert_close(out[i:i + 1], ref, base.weight.dtype, scale=_scale(ref))


@given(layer_cases(torch.float64), st.integers(1, 2), names_per_row, st.integers(0, 2**16))
def test_gradients_equal_running_each_adapters_rows_alone(
    case: Case, second_rank: int, names: list[str | None], seed: int
) -> None:
    _two_adapters(case, second_rank)
    case.model.train()
    twin = copy.deepcopy(case.model)
    x = _batch(case, len(names), seed)
    floats = case.kind != "embedding"
    x1, x2 = (x.clone().requires_grad_(floats), x.clone().requires_grad_(floats))
    with lp.adapter_per_sample(case.model, names):
        out = case.model(x1)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                          dtype=out.dtype)
    loss = (out * weights).sum()

    total = torch.zeros((), dtype=torch.float64)
    for name in set(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        if name is None:
            with lp.disable_adapters(twin):
                part = twin(x2[rows])
        else:
            lp.set_adapter(twin, name)
            part = twin(x2[rows])
        total = total + (part * weights[rows]).sum()
    if not loss.requires_grad:  # only base rows of an embedding: nothing to differentiate
        assert not total.requires_grad
        return
    loss.backward()
    total.backward()

    got = dict(case.model.named_parameters())
    for key, p in twin.named_parameters():
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(got[key].grad, p.grad, msg=key)
        elif p.requires_grad:  # an adapter no row used gets no gradient
            assert got[key].grad is None or not got[key].grad.any(), key
    if floats:
        torch.testing.assert_close(x1.grad, x2.grad)


def test_per_row_dropout_drops_each_rows_branch_input() -> None:
    """Linear(1, d): a row's branch input is 0 or x / (1 - p), so its output is one of two."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 3, dtype=torch.float64))
    lp.inject_lora(model, target="0", rank=1, name="a", dropout=0.5)
    lp.inject_lora(model, target="0", rank=1, name="b", dropout=0.25)
    randomize_adapters(model)
    layer, base = model[0], copy.deepcopy(model[0].base_layer)
    x = torch.randn(64, 1, dtype=torch.float64)
    names = ["a", "b"] * 32
    model.train()
    with lp.adapter_per_sample(model, names):
        out = model(x)
    kept = []
    for i, name in enumerate(names):
        a, b, p = layer.lora_A[name], layer.lora_B[name], layer.dropout[name]
        plain = base(x[i])
        full = plain + layer.scaling[name] * (x[i] / (1 - p)) @ a.t() @ b.t()
        kept.append(not torch.allclose(out[i], plain))
        torch.testing.assert_close(out[i], full if kept[-1] else plain)
    assert any(kept) and not all(kept)


def test_rows_of_a_single_adapter_equal_the_plain_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    lp.inject_lora(model, target=nn.Linear, rank=2, name="a")
    lp.inject_lora(model, target=nn.Linear, rank=3, name="b")
    randomize_adapters(model)
    x = torch.randn(5, 6)
    lp.set_adapter(model, "b")
    plain = model(x)
    lp.set_adapter(model, "a")
    with lp.adapter_per_sample(model, ["b"] * 5):
        torch.testing.assert_close(model(x), plain)
    with lp.adapter_per_sample(model, [None] * 5), torch.no_grad():
        routed = model(x)
    with lp.disable_adapters(model):
        assert torch.equal(routed, model(x))


def test_routing_ends_with_the_block_and_nests() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lp.inject_lora(model, target="0", rank=2, name="a")
    lp.inject_lora(model, target="0", rank=2, name="b")
    randomize_adapters(model)
    x = torch.randn(2, 4)

    def alone(name: str | None, row: int) -> torch.Tensor:
        if name is None:
            with lp.disable_adapters(model):
                return model(x[row:row + 1])
        lp.set_adapter(model, name)
        out = model(x[row:row + 1])
        lp.set_adapter(model, "a")
        return out

    b1, none0, b0 = alone("b", 1), alone(None, 0), alone("b", 0)
    with lp.adapter_per_sample(model, ["b", None]):
        with lp.adapter_per_sample(model, [None, "b"]):
            torch.testing.assert_close(model(x)[1:], b1)
            torch.testing.assert_close(model(x)[:1], none0)
        torch.testing.assert_close(model(x)[:1], b0)
    with pytest.raises(RuntimeError, match="boom"), lp.adapter_per_sample(model, ["b", "b"]):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(x), torch.cat([alone("a", 0), alone("a", 1)]))


def test_layers_lacking_an_adapter_compute_the_base_for_its_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    lp.inject_lora(model, target=["0", "1"], rank=2, name="a")
    lp.inject_lora(model, target="1", rank=2, name="b")  # layer 0 has no "b"
    randomize_adapters(model)
    x = torch.randn(3, 4)
    with lp.adapter_per_sample(model, ["b", "a", "b"]):
        out = model(x)
    lp.set_adapter(model, "b")  # layer 0 lacks it and computes its base
    torch.testing.assert_close(out[[0, 2]], model(x[[0, 2]]))
    lp.set_adapter(model, "a")
    torch.testing.assert_close(out[1:2], model(x[1:2]))


def test_parameters_replaced_inside_the_block_are_used() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3))
    lp.inject_lora(model, target="0", rank=2, name="a")
    randomize_adapters(model)
    base, layer = copy.deepcopy(model[0].base_layer), model[0]
    x = torch.randn(2, 2, 7)
    with lp.adapter_per_sample(model, ["a", None]):
        model(x)
        layer.lora_B["a"] = nn.Parameter(torch.randn_like(layer.lora_B["a"]))
        layer.set_scale("a", 5.0)
        ref = _row_reference(Case("conv", model, x, 2, 5.0), base, layer, x[:1], "a")
        assert_close(model(x)[:1], ref, scale=_scale(ref))


# ---------------------------------------------------------------- errors


def _ab_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4))
    lp.inject_lora(model, target="0", rank=2, name="a")
    lp.inject_lora(model, target="0", rank=2, name="b")
    return model


def _enter(model: nn.Module, names: object) -> None:
    with lp.adapter_per_sample(model, names):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize("names", ["a", [], [1, "a"], ("a", b"b"), None])
def test_names_must_be_a_list_of_names_and_none(names: object) -> None:
    with pytest.raises(lp.ConfigError, match=r"one adapter name \(or None for the base model\) "
                                             "per row"):
        _enter(_ab_model(), names)


def test_unknown_names_are_refused_with_suggestions() -> None:
    with pytest.raises(lp.AdapterError, match=r"unknown adapter name\(s\) \['c'\].*\['a', 'b'\]"):
        _enter(_ab_model(), ["a", "c"])


def test_a_model_without_lora_layers_is_refused() -> None:
    with pytest.raises(lp.StateError, match=r"adapter_per_sample: the model \(Sequential\) has "
                                            "no LoRA layers"):
        _enter(nn.Sequential(nn.Linear(2, 2)), ["a"])


def test_merged_or_disabled_models_are_refused() -> None:
    model = _ab_model()
    lp.merge(model)
    with pytest.raises(lp.StateError, match=r"layers \['0'\] are merged; call "
                                            r"loraplug.unmerge\(model\) first"):
        _enter(model, ["a"])
    lp.unmerge(model)
    with lp.disable_adapters(model), pytest.raises(lp.StateError, match="adapters disabled"):
        _enter(model, ["a"])


class _Padded(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def test_layers_computed_through_their_weight_are_refused() -> None:
    model = nn.Sequential(_Padded(3, 3))
    lp.inject_lora(model, target="0", rank=1)
    with pytest.raises(lp.StateError, match=r"\['0'\] compute through their weight"):
        _enter(model, ["default"])


class _Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


@lp.register_lora_layer(_Affine)
class _LoRAAffine(lp.LoRALayer):
    """A user-registered layer type that does not implement routed_lora."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def lora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return (x @ self.lora_A[name].t()) @ self.lora_B[name].t() * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.lora_B[name] @ self.lora_A[name] * self.scaling[name]

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, 3), (3, rank)


def test_layer_types_without_routed_lora_are_refused() -> None:
    model = nn.Sequential(_Affine())
    lp.inject_lora(model, target="0", rank=1)
    with pytest.raises(lp.StateError, match="without routed_lora"):
        _enter(model, ["default"])


def test_an_input_with_another_number_of_rows_is_refused() -> None:
    model = _ab_model()
    with lp.adapter_per_sample(model, ["a", "b"]), pytest.raises(
            lp.StateError, match=r"given 2 adapter names.*input of shape \(3, 4\)"):
        model(torch.randn(3, 4))


def test_merging_inside_the_block_is_refused_at_the_next_call() -> None:
    model = _ab_model()
    with lp.adapter_per_sample(model, ["a", "b"]):
        lp.merge(model)
        with pytest.raises(lp.StateError, match="merged inside adapter_per_sample"):
            model(torch.randn(2, 4))


# ---------------------------------------------------------------- the fast forward path


def _dense(layer: lp.LoRALayer, base: nn.Module, kind: str, x: torch.Tensor,
           names: tuple[str, ...]) -> torch.Tensor:
    """The adapted output from the layer's current raw tensors, in float64."""
    weight = layer.weight.double()
    for n in names:
        weight = weight + delta(kind, layer.lora_A[n], layer.lora_B[n], layer.scaling[n],
                                getattr(base, "groups", 1))
    base64 = copy.deepcopy(base).double()
    with torch.no_grad():
        base64.weight.copy_(layer.weight.double())
        if getattr(base64, "bias", None) is not None:
            base64.bias.copy_(layer.bias.double())
    return dense_forward(base64, weight, x if kind == "embedding" else x.double())


@given(layer_cases(torch.float64), st.sampled_from(["eval", "train"]))
def test_fast_path_gradients_match_the_dense_reference(case: Case, mode: str) -> None:
    """Two active adapters accumulate into the base output in place; autograd agrees."""
    if case.kind == "embedding" and (case.base.max_norm is not None or case.base.padding_idx
                                     is not None or case.base.scale_grad_by_freq):
        # These act on the lookup of A only (B's gradient is not masked or scaled), and
        # max_norm renormalises without a gradient: not the gradient of a dense W + ΔW.
        return
    _two_adapters(case, 1)
    lp.set_adapter(case.model, ["a", "b"])
    getattr(case.model, mode)()
    layer = case.model[0]
    x = case.x.clone().requires_grad_(case.kind != "embedding")
    out = case.model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0),
                          dtype=out.dtype)
    (out * weights).sum().backward()

    leaves = {(n, s): getattr(layer, f"lora_{s}")[n].detach().clone().requires_grad_()
              for n in NAMES for s in "AB"}
    x_ref = case.x.clone().requires_grad_(case.kind != "embedding")
    weight = layer.weight.double()
    for n in NAMES:
        weight = weight + delta(case.kind, leaves[n, "A"], leaves[n, "B"], layer.scaling[n],
                                case.groups)
    base = copy.deepcopy(layer.base_layer).double()
    ref = dense_forward(base, weight, x_ref if case.kind == "embedding" else x_ref.double())
    (ref * weights).sum().backward()
    assert_close(out, ref, scale=_scale(ref))
    for (n, s), leaf in leaves.items():
        grad = getattr(layer, f"lora_{s}")[n].grad
        assert_close(grad, leaf.grad, scale=_scale(leaf.grad))
    if x.requires_grad:
        assert_close(x.grad, x_ref.grad, scale=_scale(x_ref.grad))


@pytest.mark.parametrize("change", ["to_double", "load_state_dict", "load_assign",
                                    "replace_parameter", "data_writes", "delete_adapter",
                                    "set_scale"])
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_forward_uses_the_current_tensors_after_a_change(kind: str, change: str) -> None:
    """No stale tensors: whatever replaces or rewrites a parameter is seen by the next call."""
    torch.manual_seed(0)
    base, x = {
        "linear": (nn.Linear(4, 3), torch.randn(2, 4)),
        "conv": (nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), torch.randn(2, 2, 5, 5)),
        "embedding": (nn.Embedding(7, 3), torch.randint(0, 7, (2, 3))),
    }[kind]
    model = nn.Sequential(copy.deepcopy(base))
    lp.inject_lora(model, target="0", rank=2, name="a")
    lp.inject_lora(model, target="0", rank=2, name="b")
    lp.set_adapter(model, ["a", "b"])
    randomize_adapters(model)
    model(x)  # the first call, before the change
    live = ("a", "b")
    if change == "to_double":
        model.to(torch.float64)
        x = x if kind == "embedding" else x.double()
    elif change in ("load_state_dict", "load_assign"):
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=change == "load_assign")
    elif change == "replace_parameter":
        layer = model[0]
        layer.lora_A["a"] = nn.Parameter(torch.randn_like(layer.lora_A["a"]))
        layer.weight = nn.Parameter(torch.randn_like(layer.weight))
    elif change == "data_writes":  # no version counter sees these
        layer = model[0]
        layer.lora_B["b"].data = torch.randn_like(layer.lora_B["b"])
        layer.lora_A["a"].data.mul_(-2.0)
        layer.weight.data.copy_(torch.randn_like(layer.weight))
    elif change == "delete_adapter":
        lp.delete_adapter(model, "b")
        live = ("a",)
    else:
        model[0].set_scale("b", 7.0)
    for names in (live, live[:1]):
        lp.set_adapter(model, list(names))
        ref = _dense(model[0], base, kind, x, names)
        assert_close(model(x), ref, scale=_scale(ref))
        with lp.adapter_per_sample(model, [names[0], None]):
            routed = model(x)
        ref_rows = _dense(model[0], base, kind, x[:1], names[:1])
        assert_close(routed[:1], ref_rows, scale=_scale(ref_rows))


class _Tripled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * super().forward(x)


@lp.register_lora_layer(_Tripled)
class _LoRATripled(lp.LoRALinear):
    """A user layer that redefines the branch and ΔW of LoRALinear."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * super().base_forward(x)

    def lora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return 3 * super().lora_forward(x, name)

    def delta_weight(self, name: str) -> torch.Tensor:
        return 3 * super().delta_weight(name)


def test_a_subclass_that_redefines_the_math_gets_its_own_math() -> None:
    """A parent's fused forward and merge are not inherited past a redefined lora_forward
    or delta_weight: the output is 3·(W + ΔW)x and merging adds the subclass's 3·ΔW."""
    torch.manual_seed(0)
    model = nn.Sequential(_Tripled(4, 3, dtype=torch.float64))
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    layer, x = model[0], torch.randn(5, 4, dtype=torch.float64)
    w0 = layer.weight.detach().clone()
    d = delta("linear", layer.lora_A["default"], layer.lora_B["default"],
              layer.scaling["default"])
    assert_close(model(x), 3 * torch.nn.functional.linear(x, w0 + d, layer.bias))
    lp.merge(model)
    assert_close(layer.weight, w0 + 3 * d)
    lp.unmerge(model)
    with pytest.raises(lp.StateError, match="without routed_lora"):
        _enter(model, ["default"])


def test_a_block_serves_inference_mode_and_training_calls() -> None:
    """Index tensors made during an inference_mode call are usable by a training call."""
    torch.manual_seed(0)
    model = _ab_model()
    randomize_adapters(model)
    x = torch.randn(3, 4)
    with lp.adapter_per_sample(model, ["b", None, "a"]):
        with torch.inference_mode():
            first = model(x)
        out = model(x)
        out.sum().backward()
    torch.testing.assert_close(out.detach(), first)
    assert model[0].lora_B["b"].grad is not None and model[0].lora_B["a"].grad is not None


def test_deleting_a_routed_adapter_inside_the_block_is_refused() -> None:
    torch.manual_seed(0)
    model = _ab_model()
    randomize_adapters(model)
    x = torch.randn(3, 4)
    with lp.adapter_per_sample(model, ["b", None, "b"]):
        expected = model(x)
        with pytest.raises(lp.StateError, match=r"delete_adapter: adapter 'b' is in use inside "
                                                r"adapter_per_sample on \['0'\]; delete it "
                                                r"after the with block"):
            lp.delete_adapter(model, "b")
        lp.delete_adapter(model, "a")  # not routed in this block: fine
        assert torch.equal(model(x), expected)
    lp.delete_adapter(model, "b")
