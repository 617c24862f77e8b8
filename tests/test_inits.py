"""Initialisations: every one starts the adapted model at the base function; PEFT's values."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, conv_cases, embedding_cases, linear_cases
from test_files import assert_unchanged, snapshot
from torch import nn

import loraplug as lp
from loraplug._inits import plain_tensors

INITS = ["orthogonal", "olora", "pissa", "pissa_niter_4"]


def usable(case: Case, init: str) -> Case:
    """The case with a rank ``init`` accepts: even per group for orthogonal."""
    if init == "orthogonal":
        case.rank = 2 * case.groups
    return case


def cases(dtype: torch.dtype) -> st.SearchStrategy[Case]:
    return st.one_of(linear_cases(dtype), conv_cases(dtype=dtype), embedding_cases(dtype))


@pytest.mark.filterwarnings("ignore:the rank exceeds the rank")  # orthogonal's even rank
@given(case=cases(torch.float64), init=st.sampled_from(INITS), rslora=st.booleans())
def test_fresh_adapter_computes_the_base_function(case: Case, init: str, rslora: bool) -> None:
    case = usable(case, init)
    base = copy.deepcopy(case.base)
    weight = base.weight.detach().clone()
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, init=init,
                   use_rslora=rslora)
    layer = case.model[0]
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert a.abs().sum() > 0 and b.abs().sum() > 0  # both factors start non-zero
    # W' + s·ΔW = W: the dense reference from the raw tensors.
    start = layer.weight.detach() + delta(case.kind, a, b, layer.scaling["default"], case.groups)
    assert_close(start, weight)
    assert_close(case.model(case.x), dense_forward(base, weight, case.x))
    if init == "orthogonal":  # the base is not touched at all
        assert torch.equal(layer.weight, weight)
    else:
        assert not torch.equal(layer.weight, weight)
        a0, b0 = layer.initial_values["default"]
        assert torch.equal(a0, a.detach()) and torch.equal(b0, b.detach())
    assert layer.init["default"] == init


@given(case=cases(torch.float32), init=st.sampled_from(["olora", "pissa"]))
def test_plain_conversion_is_the_update_against_the_original_weight(case: Case,
                                                                       init: str) -> None:
    weight = case.base.weight.detach().double().clone()
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, init=init)
    layer = case.model[0]
    with torch.no_grad():  # "training"
        layer.lora_A["default"].add_(0.1 * torch.randn_like(layer.lora_A["default"]))
        layer.lora_B["default"].add_(0.1 * torch.randn_like(layer.lora_B["default"]))
    s = layer.scaling["default"]
    a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    trained = layer.weight.detach().double() + delta(case.kind, a, b, s, case.groups)
    a2, b2 = plain_tensors(a, b, *layer.initial_values["default"])
    assert a2.shape[0] == 2 * case.rank
    # Twice the rank at the same scaling: s = 2·alpha / 2r.
    assert_close(weight + delta(case.kind, a2, b2, s, case.groups), trained,
                 dtype=torch.float32, scale=10)


def peft_layer(base: nn.Module, init: str, **config: object) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["0"], init_lora_weights=init, **config)).base_model.model[0]


@pytest.mark.parametrize("init", ["olora", "pissa"])
@pytest.mark.parametrize("rslora", [False, True])
def test_values_equal_peft(init: str, rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 9))
    theirs = peft_layer(base, init, r=4, lora_alpha=6, use_rslora=rslora)
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target="0", rank=4, alpha=6, init=init, use_rslora=rslora)
    torch.testing.assert_close(ours[0].lora_A["default"], theirs.lora_A["default"].weight)
    torch.testing.assert_close(ours[0].lora_B["default"], theirs.lora_B["default"].weight)
    torch.testing.assert_close(ours[0].weight, theirs.base_layer.weight)


def test_orthogonal_has_peft_statistics() -> None:
    # Random values: compare what PEFT's construction guarantees, B A = 0 and |A| ~ 1/10.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    lp.inject_lora(model, target="0", rank=8, init="orthogonal")
    a, b = model[0].lora_A["default"], model[0].lora_B["default"]
    assert (b @ a).abs().max() < 1e-6
    assert 0.05 < a.std().item() < 0.2 and 0.05 < b.std().item() < 0.2
    theirs = peft_layer(nn.Sequential(nn.Linear(64, 48)), "orthogonal", r=8)
    assert theirs.lora_A["default"].weight.shape == a.shape


@pytest.mark.parametrize(("model", "kwargs", "match"), [
    (nn.Sequential(nn.Linear(4, 3)), {"rank": 3, "init": "orthogonal"},
     r"'0' \(nn.Linear\): init='orthogonal' pairs rows of an orthogonal matrix, so it needs an "
     r"even rank; received rank=3"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), {"rank": 3, "init": "orthogonal"},
     r"'0' \(nn.Conv2d\): init='orthogonal' pairs rows .* even rank; received rank=3"),
    (nn.Sequential(nn.Linear(4, 3)), {"rank": 4, "init": "pissa"},
     r"init='pissa' takes the first r singular directions of a 3×4 weight, so the rank can "
     r"be at most 3; received rank=4"),
    (nn.Sequential(nn.Linear(4, 3)), {"rank": 2, "init": "svd"},
     r"init must be one of \['kaiming', 'gaussian', 'orthogonal', 'olora', 'pissa', "
     r"'pissa_niter_<k>'\].*received 'svd'"),
    (nn.Sequential(nn.Linear(4, 3)), {"rank": 2, "init": "pissa_niter_0"},
     r"received 'pissa_niter_0'"),
])
def test_unusable_inits_are_refused_before_any_change(model: nn.Module, kwargs: dict,
                                                      match: str) -> None:
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=match):
        lp.inject_lora(model, target="0", **kwargs)
    assert_unchanged(model, before)


def test_rewriting_a_tied_weight_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
    model[1].weight = model[0].weight
    before = snapshot(model)
    with pytest.raises(lp.StateError, match=r"inject_lora\(init='pissa'\) rewrites the base "
                                            r"weight to W − s·B₀A₀, but the weight of '1' with "
                                            r"\['0'\] is shared \(tied\)"):
        lp.inject_lora(model, target="1", rank=2, init="pissa")
    assert_unchanged(model, before)


def test_rewriting_under_other_adapters_warns() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    lp.inject_lora(model, target="0", rank=2)
    with pytest.warns(lp.LoRAWarning, match=r"rewrites the base weight of \['0'\], which carry "
                                            r"other adapters"):
        lp.inject_lora(model, target="0", rank=2, init="olora", name="b")


class Odd(nn.Module):
    """A module with a weight whose LoRA factors are not B A on its rows and columns."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


@lp.register_lora_layer(Odd)
class LoRAOdd(lp.LoRALinear):
    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (4, rank), (6, rank)  # A stored transposed


def test_a_layer_type_without_the_matrix_form_is_refused() -> None:
    with pytest.raises(lp.ConfigError, match=r"init='olora' needs ΔW written as B A on the "
                                             r"weight's rows and columns, which LoRAOdd does "
                                             r"not declare"):
        lp.inject_lora(nn.Sequential(Odd()), target="0", rank=2, init="olora")


def trained_pissa(init: str = "pissa") -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5))
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=nn.Linear, rank=2, alpha=4, init=init)
    with torch.no_grad():  # "training"
        for key, p in model.named_parameters():
            if ".lora_" in key:
                p.add_(0.1 * torch.randn_like(p))
    return base, model, torch.randn(3, 8)


def test_plain_save_loads_on_the_original_weights(tmp_path: Path) -> None:
    base, model, x = trained_pissa()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lp.save_adapter(model, tmp_path / "plain", plain=True)
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
    fresh = copy.deepcopy(base)
    lp.load_adapter(fresh, tmp_path / "plain")
    torch.testing.assert_close(fresh(x), model(x))
    assert torch.equal(fresh[0].weight, base[0].weight)  # a plain adapter: W untouched
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain"))
    torch.testing.assert_close(theirs(x), model(x))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rewriting_files_rebuild_the_residual_as_peft_does(init: str, tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    base, model, x = trained_pissa(init)
    lp.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())[
        "init_lora_weights"] == init
    fresh = copy.deepcopy(base)
    lp.load_adapter(fresh, tmp_path / "ours")
    torch.testing.assert_close(fresh(x), model(x))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(x), model(x))
    theirs.save_pretrained(str(tmp_path / "peft"))
    again = copy.deepcopy(base)
    lp.load_adapter(again, tmp_path / "peft")
    torch.testing.assert_close(again(x), model(x))


def test_plain_save_needs_the_starting_values(tmp_path: Path) -> None:
    _, model, _ = trained_pissa()
    model[0].initial_values.clear()  # as after a restart from a state dict
    with pytest.raises(lp.AdapterFileError, match=r"save_adapter\(plain=True\): \['0'\] have "
                                                  r"no starting values of adapter 'default'"):
        lp.save_adapter(model, tmp_path, plain=True)
    with pytest.raises(lp.AdapterFileError, match=r"plain must be True or False; received 1"):
        lp.save_adapter(model, tmp_path, plain=1)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_mica_files_load_as_plain_adapters(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, x = nn.Sequential(nn.Linear(8, 6)), torch.randn(3, 8)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["0"], r=2, init_lora_weights="mica"))
    with torch.no_grad():
        theirs.base_model.model[0].lora_A["default"].weight.normal_()
    theirs.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    lp.load_adapter(ours, tmp_path)
    torch.testing.assert_close(ours(x), theirs(x))
