"""Where a layer's weight lives: parametrizations, hooks that compute it, memory shared with
other modules; state-dict loads into merged layers; training while merged; merge precision."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from reference import assert_close
from strategies import randomize_adapters
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import loraplug as lp

X = torch.randn(5, 6, dtype=torch.float64)


def frozen(model: nn.Module) -> tuple[dict, dict]:
    """Every tensor (buffers included) and every layer's merged adapters."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: getattr(m, "merged_adapters", None) for n, m in model.named_modules()})


def assert_frozen(model: nn.Module, before: tuple[dict, dict]) -> None:
    state, merged = frozen(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert merged == before[1]


def dense(layer: lp.LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The adapted Linear from its (computed) weight and the raw A, B: F.linear on W + ΔW."""
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    return F.linear(x, layer.weight + layer.scaling["default"] * b @ a, layer.bias)


def parametrized(kind: str, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).to(dtype)
    {"weight_norm": parametrizations.weight_norm, "orthogonal": parametrizations.orthogonal,
     "spectral_norm": parametrizations.spectral_norm}[kind](model[0])
    return model


# ----------------------------------------------------------------- parametrizations
@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal", "spectral_norm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_fresh_adapter_on_a_parametrized_weight_changes_nothing(kind: str, mode: str) -> None:
    model, plain = parametrized(kind), parametrized(kind)
    model.train(mode == "train")
    plain.train(mode == "train")
    lp.inject_lora(model, target="0", rank=2)  # reads the weight: no power iteration
    for _ in range(2):  # spectral_norm's power iteration advances the same in both
        assert torch.equal(model(X), plain(X))


def test_loading_a_fresh_adapter_onto_spectral_norm_changes_nothing(tmp_path: Path) -> None:
    source = parametrized("spectral_norm")
    lp.inject_lora(source, target="0", rank=2)
    lp.save_adapter(source, tmp_path)
    model, plain = parametrized("spectral_norm"), parametrized("spectral_norm")
    lp.load_adapter(model, tmp_path)  # checks read the weight: no power iteration
    for _ in range(2):
        assert torch.equal(model(X), plain(X))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merge_writes_through_weight_norm_and_unload_keeps_the_adapter(
        dtype: torch.dtype) -> None:
    model, x = parametrized("weight_norm", dtype), X.to(dtype)
    original = model[0]
    lp.inject_lora(model, target="0", rank=2)
    layer = model[0]
    randomize_adapters(model)
    adapted = dense(layer, x).detach()
    assert_close(model(x), adapted)
    expected = layer.merged_weight()  # W + ΔW
    lp.merge(model)
    assert layer.merged
    with torch.no_grad():
        assert_close(model(x), adapted)
        assert_close(layer.weight, expected)  # the parametrization computes W + ΔW now
    lp.unmerge(model)
    with torch.no_grad():
        assert_close(model(x), adapted)
    unloaded = lp.unload(model, merge=True)
    assert unloaded[0] is original and parametrize.is_parametrized(original, "weight")
    with torch.no_grad():
        assert_close(unloaded(x), adapted)


@pytest.mark.parametrize("kind", ["orthogonal", "spectral_norm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_parametrization_that_cannot_hold_the_merge_refuses_it(kind: str, dtype: torch.dtype,
                                                                 tmp_path: Path) -> None:
    model, x = parametrized(kind, dtype).eval(), X.to(dtype)
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    adapted = dense(model[0], x).detach()
    before = frozen(model)
    why = r"layers \['0'\] cannot be merged: its parametrization \['_\w+'\] cannot hold W \+ ΔW"
    for call, label in ((lp.merge, "merge"), (lambda m: lp.merge(m, safe=True), "merge"),
                        (lambda m: lp.unload(m, merge=True), r"unload\(merge=True\)")):
        with pytest.raises(lp.StateError, match=label + ": " + why):
            call(model)
        assert_frozen(model, before)
    with pytest.raises(lp.StateError, match=r"LoRALinear cannot be merged: its parametrization"):
        model[0].merge()
    with pytest.raises(lp.StateError, match=r"save_merged: .* computed by a parametrization"):
        lp.save_merged(model, tmp_path / "m.safetensors")
    assert_frozen(model, before)
    assert_close(model(x), adapted)  # and the unmerged adapter stays correct


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def test_a_parametrization_without_right_inverse_refuses_to_merge() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).double()
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    lp.inject_lora(model, target="0", rank=2)
    before = frozen(model)
    with pytest.raises(lp.StateError, match=r"its parametrization \['Symmetric'\] cannot be "
                                            r"assigned a weight \(.*right_inverse"):
        lp.merge(model)
    assert_frozen(model, before)


def test_a_model_merge_refused_on_one_layer_changes_no_other_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)).double()
    parametrizations.weight_norm(model[0])
    parametrizations.orthogonal(model[1])
    lp.inject_lora(model, target=nn.Linear, rank=2)
    randomize_adapters(model)
    before = frozen(model)
    with pytest.raises(lp.StateError, match=r"merge: layers \['1'\] cannot be merged"):
        lp.merge(model)
    assert_frozen(model, before)  # '0' could merge, but nothing did


# ----------------------------------------------------------------- weights computed by hooks
def hooked(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated
        if kind == "spectral_norm":
            nn.utils.spectral_norm(model[0])
        elif kind == "weight_norm":
            nn.utils.weight_norm(model[0])
        else:
            prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm", "prune"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_fresh_adapter_on_a_hook_computed_weight_changes_nothing(kind: str, mode: str) -> None:
    model, plain = hooked(kind), hooked(kind)
    with torch.no_grad():  # the hook must recompute the weight, not keep a stale one
        for m in (model, plain):
            next(p for n, p in m[0].named_parameters() if n != "bias").mul_(1.5)
    model.train(mode == "train")
    plain.train(mode == "train")
    lp.inject_lora(model, target="0", rank=2)
    for _ in range(2):
        assert torch.equal(model(X), plain(X))
    randomize_adapters(model)
    y = model(X)
    assert_close(y, dense(model[0], X))  # the weight the hook computed this forward


@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm", "prune"])
def test_a_hook_computed_weight_refuses_to_merge(kind: str, tmp_path: Path) -> None:
    model = hooked(kind).eval()
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    model(X)
    before = frozen(model)
    why = r"cannot be merged: its weight is not a stored tensor but computed on every forward"
    for call in (lp.merge, lambda m: lp.unload(m, merge=True), lambda m: m[0].merge(),
                 lambda m: lp.save_merged(m, tmp_path / "m.safetensors")):
        with pytest.raises(lp.StateError, match=why):
            call(model)
        assert_frozen(model, before)
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------- shared memory
def test_weights_sharing_memory_are_tied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight.data = model[0].weight.data  # two Parameters, one memory
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    other = model[1](torch.ones(1, 4)).detach()
    before = frozen(model)
    with pytest.raises(lp.StateError, match=r"merge: the weight of '0' with \['1'\] is shared "
                                            r"\(tied\)"):
        lp.merge(model)
    assert_frozen(model, before)
    assert torch.equal(model[1](torch.ones(1, 4)), other)


def test_overlapping_views_are_tied_and_disjoint_ones_are_not() -> None:
    torch.manual_seed(0)
    flat = torch.randn(3 * 16)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    for i, offset in enumerate((0, 16, 8)):  # '2' overlaps both halves
        model[i].weight.data = flat[offset:offset + 16].view(4, 4)
    lp.inject_lora(model, target=["0", "1"], rank=2)
    randomize_adapters(model)
    with pytest.raises(lp.StateError, match=r"'0' with \['2'\]; '1' with \['2'\]"):
        lp.merge(model)
    model[2].weight.data = model[2].weight.data.clone()  # now '0' and '1' touch no other
    expected = model(torch.ones(2, 4)).detach()
    lp.merge(model)
    with torch.no_grad():
        assert_close(model(torch.ones(2, 4)), expected)


# ----------------------------------------------------------------- load_state_dict, merged
def merged_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6)).double()
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    lp.merge(model)
    return model


def test_loading_a_base_weight_into_a_merged_layer_unmerges_its_bookkeeping() -> None:
    model = merged_model()
    base = nn.Sequential(nn.Linear(6, 6)).double()
    with pytest.warns(lp.LoRAWarning, match=r"load_state_dict replaced the weight of a LoRA "
                                            r"layer that had \['default'\] merged; the loaded "
                                            r"weight is taken as the base weight"):
        model.load_state_dict(base.state_dict(), strict=False)
    layer = model[0]
    assert not layer.merged
    assert torch.equal(layer.weight, base[0].weight)
    assert_close(model(X), dense(layer, X))  # base + adapter, not the base alone
    lp.unmerge(model)  # a no-op: nothing to subtract from a weight that never held ΔW
    assert torch.equal(layer.weight, base[0].weight)


def test_loading_what_a_merged_layer_holds_keeps_it_merged() -> None:
    model = merged_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(state)
    assert model[0].merged_adapters == ("default",)


def test_loading_new_adapter_values_into_a_merged_layer_unmerges_the_old_ones_first() -> None:
    model = merged_model()
    layer = model[0]
    original = layer.weight.detach() - layer.delta_weight("default")
    new = {"0.lora_B.default": torch.randn_like(layer.lora_B["default"])}
    with pytest.warns(lp.LoRAWarning, match=r"loads new values into adapters \['default'\], "
                                            r"which were merged into the weight; they were "
                                            r"unmerged first"):
        model.load_state_dict(new, strict=False)
    assert not layer.merged
    assert_close(layer.weight, original)
    assert torch.equal(layer.lora_B["default"], new["0.lora_B.default"])
    assert_close(model(X), dense(layer, X))


def test_loading_into_a_merged_parametrized_layer_unmerges_its_bookkeeping() -> None:
    model = parametrized("weight_norm")
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    lp.merge(model)
    base = parametrized("weight_norm")
    with pytest.warns(lp.LoRAWarning, match=r"the loaded weight is taken as the base weight"):
        model.load_state_dict(base.state_dict(), strict=False)
    assert not model[0].merged
    assert_close(model(X), dense(model[0], X))


# ----------------------------------------------------------------- training while merged
def test_a_training_forward_through_a_merged_layer_warns_once() -> None:
    model = merged_model()
    with pytest.warns(lp.LoRAWarning, match=r"a LoRALinear with \['default'\] merged runs "
                                            r"forward in training mode: .*loraplug.unmerge"):
        model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(X)  # once per layer
        fresh = merged_model()
        fresh.eval()(X)  # inference: quiet
        with torch.no_grad():
            fresh.train()(X)
        lp.unmerge(fresh)
        fresh(X)  # unmerged: the adapters train


# ----------------------------------------------------------------- merge precision
def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at ``|x|``, in float64."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, torch.inf)).double() - a.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_unmerge_comes_back_within_one_ulp_of_the_merged_size(dtype: torch.dtype,
                                                               seed: int) -> None:
    # docs/concepts.md: each element within one ulp of the larger of |W| and |W + ΔW|.
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.Conv2d(3, 5, 3)).to(dtype)
    lp.inject_lora(model, target=["0", "1"], rank=4, alpha=8)
    for layer in (model[0], model[1]):
        nn.init.normal_(layer.lora_B["default"], std=(0.01, 0.3, 3.0, 30.0)[seed])
    before = [layer.weight.detach().clone() for layer in (model[0], model[1])]
    lp.merge(model)
    merged = [layer.weight.detach().clone() for layer in (model[0], model[1])]
    lp.unmerge(model)
    for w, m, layer in zip(before, merged, (model[0], model[1])):
        size = torch.maximum(w.abs(), m.abs())
        assert ((layer.weight.detach().double() - w.double()).abs() <= _ulp(size)).all()
