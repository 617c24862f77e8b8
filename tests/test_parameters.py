"""LoRA on bare parameters (``target_parameters``) against the dense reference."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, parameter_delta
from strategies import Experts, ParamCase, ParamLinear, parameter_cases, randomize_adapters
from torch import nn

import loraplug as lp


def _inject(case: ParamCase, **kwargs) -> lp.LoRALayer:
    names = lp.inject_lora(case.model, target_parameters=f"0.{case.parameter}", rank=case.rank,
                           alpha=case.alpha, **kwargs)
    assert names == [f"0.{case.parameter}"]
    return case.model[0].lora_parameters[case.parameter]


def _transposed(owner: nn.Module) -> bool:
    return getattr(owner, "is_transposed", False) is True


def _reference(case: ParamCase, owner: nn.Module, layer: lp.LoRALayer, names: list[str]):
    """The owner's own forward in float64 on W + Σ ΔW, ΔW from the raw A and B."""
    plain = copy.deepcopy(owner).double()
    weight = plain._parameters[case.parameter].detach().clone()
    for n in names:
        weight += parameter_delta(layer.lora_A[n], layer.lora_B[n], layer.scaling[n],
                                  case.shape, _transposed(owner))
    with torch.no_grad():
        plain._parameters[case.parameter].copy_(weight)
    return plain(case.x.double())


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item())


@given(parameter_cases())
def test_fresh_parameter_adapter_is_bit_identical(case: ParamCase) -> None:
    expected = copy.deepcopy(case.owner)(case.x)
    _inject(case)
    assert torch.equal(case.model(case.x), expected)


@given(parameter_cases(), st.sampled_from(["eval", "train"]))
def test_parameter_adapter_unmerged_and_merged_match_reference(case: ParamCase,
                                                               mode: str) -> None:
    owner = copy.deepcopy(case.owner)
    layer = _inject(case)
    randomize_adapters(case.model)
    getattr(case.model, mode)()
    ref = _reference(case, owner, layer, ["default"])
    dtype = case.x.dtype
    unmerged = case.model(case.x)
    assert unmerged.dtype == dtype
    assert_close(unmerged, ref, dtype, scale=_scale(ref))
    lp.merge(case.model)
    assert layer.merged
    assert_close(case.model(case.x), ref, dtype, scale=_scale(ref))
    lp.unmerge(case.model)
    assert_close(layer.weight, owner._parameters[case.parameter], scale=_scale(ref))


@given(parameter_cases(torch.float32))
def test_parameter_adapter_merged_equals_unmerged_in_float32(case: ParamCase) -> None:
    _inject(case)
    randomize_adapters(case.model)
    unmerged = case.model(case.x)
    lp.merge(case.model)
    merged = case.model(case.x)
    assert ((merged - unmerged).norm() / unmerged.norm().clamp_min(1e-12)).item() <= 1e-5


@given(parameter_cases(torch.float64), st.integers(0, 2**16))
def test_two_parameter_adapters_add_up(case: ParamCase, seed: int) -> None:
    owner = copy.deepcopy(case.owner)
    _inject(case)
    lp.inject_lora(case.model, target_parameters=f"0.{case.parameter}", rank=case.rank,
                   alpha=2 * case.alpha, name="b")
    randomize_adapters(case.model, seed)
    lp.set_adapter(case.model, ["default", "b"])
    layer = case.model[0].lora_parameters[case.parameter]
    ref = _reference(case, owner, layer, ["default", "b"])
    assert_close(case.model(case.x), ref, scale=_scale(ref))


@given(parameter_cases(torch.float32))
def test_only_parameter_adapters_train(case: ParamCase) -> None:
    layer = _inject(case)
    randomize_adapters(case.model)
    trainable = [p for p in case.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(layer.lora_A["default"]),
                                          id(layer.lora_B["default"])}
    case.model(case.x).pow(2).sum().backward()
    assert layer.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@given(parameter_cases())
def test_parameter_count_matches_layout(case: ParamCase) -> None:
    shape, r = case.shape, case.rank
    if len(shape) == 3:  # per expert: r · (in + out)
        expected = shape[0] * r * (shape[1] + shape[2])
    else:  # matrix view (out, ∏rest)
        expected = r * (shape[0] + torch.Size(shape[1:]).numel())
    before = sum(p.numel() for p in case.model.parameters())
    _inject(case)
    assert sum(p.numel() for p in case.model.parameters()) - before == expected


@given(parameter_cases())
def test_parameter_unload_restores_object_and_state(case: ParamCase) -> None:
    original = case.owner
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    _inject(case)
    randomize_adapters(case.model)
    assert set(state) <= set(case.model.state_dict())
    case.model(case.x)
    lp.unload(case.model)
    assert case.model[0] is original
    after = case.model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_two_parameters_of_one_module_share_a_host() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Parameter(torch.randn(2, 6, 4))
            self.down = nn.Parameter(torch.randn(2, 4, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.bmm(torch.relu(torch.bmm(x, self.up.transpose(1, 2))),
                             self.down.transpose(1, 2))

    model = nn.Sequential(Pair())
    x = torch.randn(2, 3, 4)
    names = lp.inject_lora(model, target_parameters=["0.up", "0.down"], rank=2)
    assert names == ["0.down", "0.up"]
    host = model[0]
    assert isinstance(host, lp.LoRAParameterHost) and sorted(host.lora_parameters) == ["down", "up"]
    randomize_adapters(model)
    unmerged = model(x)
    lp.merge(model)
    torch.testing.assert_close(model(x), unmerged)
    lp.unmerge(model)
    lp.unload(model)
    assert type(model[0]) is Pair


def test_parameter_layers_pickle_and_deepcopy() -> None:
    model = nn.Sequential(Experts(2, 3, 4, False))
    lp.inject_lora(model, target_parameters="0.weight", rank=2)
    randomize_adapters(model)
    x = torch.randn(2, 5, 3)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x))


def test_parameter_dropout_is_refused() -> None:
    model = nn.Sequential(ParamLinear(3, 4))
    with pytest.raises(lp.ConfigError, match="through the weight"):
        lp.inject_lora(model, target_parameters="0.weight", rank=2, dropout=0.1)
    assert type(model[0]) is ParamLinear


def test_parameter_patterns_that_match_nothing_are_named() -> None:
    model = nn.Sequential(ParamLinear(3, 4))
    with pytest.raises(lp.TargetError, match=r"Close parameter names: \['0.weight'\]"):
        lp.inject_lora(model, target_parameters="0.weigth", rank=2)
    with pytest.raises(lp.TargetError, match="fewer than 2 dimensions"):
        lp.inject_lora(model, target_parameters="0.bias", rank=2)
    with pytest.raises(lp.TargetError, match="not a glob"):
        lp.inject_lora(model, target_parameters=[nn.Linear], rank=2)


def test_target_or_target_parameters_is_required() -> None:
    with pytest.raises(lp.ConfigError, match=r"needs target .* or target_parameters"):
        lp.inject_lora(nn.Sequential(nn.Linear(2, 2)), rank=1)


def test_parameter_refusals_name_the_parameter_and_change_nothing() -> None:
    class Clash(ParamLinear):
        lora_parameters = None  # where loraplug keeps a host's layers

    model = nn.Sequential(nn.Linear(3, 3), Clash(3, 2), ParamLinear(3, 2))
    lp.inject_lora(model, target="0", rank=1)
    lp.inject_lora(model, target_parameters="2.weight", rank=1)
    lp.merge(model)
    before = [(n, id(m)) for n, m in model.named_modules()]
    for spec, error, message in (
        ("0.weight", lp.TargetError, r"'0.weight' belongs to '0', already a LoRALinear"),
        ("1.weight", lp.TargetError, r"'1' \(.*Clash\) has its own attribute 'lora_parameters'"),
        ("2.weight", lp.StateError, r"'2.weight' has \['default'\] merged"),
    ):
        with pytest.raises(error, match=message):
            lp.inject_lora(model, target_parameters=spec, rank=1, name="other")
    with pytest.raises(lp.ConfigError, match=r"'2.weight' already has an adapter named 'default'"):
        lp.inject_lora(model, target_parameters="2.weight", rank=1)
    assert [(n, id(m)) for n, m in model.named_modules()] == before
    root = ParamLinear(3, 2)
    with pytest.raises(lp.TargetError, match=r"'weight' is a parameter of the model itself"):
        lp.inject_lora(root, target_parameters="weight", rank=1)
    with torch.device("meta"):
        meta = nn.Sequential(ParamLinear(3, 2))
    with pytest.raises(lp.StateError, match=r"'0.weight' is on the meta device"):
        lp.inject_lora(meta, target_parameters="0.weight", rank=1)


def test_a_parameter_layer_is_not_called_itself() -> None:
    model = nn.Sequential(ParamLinear(3, 2))
    lp.inject_lora(model, target_parameters="0.weight", rank=1)
    with pytest.raises(NotImplementedError, match="its host runs the owner's forward"):
        model[0].lora_parameters["weight"](torch.randn(1, 3))


def test_parameter_layers_refuse_rows_with_their_own_adapter() -> None:
    model = nn.Sequential(ParamLinear(3, 2))
    lp.inject_lora(model, target_parameters="0.weight", rank=1)
    lp.inject_lora(model, target_parameters="0.weight", rank=1, name="b")
    with pytest.raises(lp.StateError, match="compute through their weight"), \
            lp.adapter_per_sample(model, ["default", "b"]):
        pass


def test_parameter_owner_hooks_stay_on_the_owner_which_is_still_called() -> None:
    model = nn.Sequential(ParamLinear(3, 4))
    owner, calls = model[0], []
    owner.register_forward_hook(lambda m, args, out: calls.append(m))
    lp.inject_lora(model, target_parameters="0.weight", rank=2)
    model(torch.randn(2, 3))
    assert calls == [owner]  # once, on the module it was registered on
    assert lp.unload(model)[0] is owner
    model(torch.randn(2, 3))
    assert calls == [owner, owner]


class Sub(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.v)


class Block(nn.Module):
    """A module with a parameter of its own, a child with one, and a Linear child."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.sub, self.fc = Sub(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.sub(torch.nn.functional.linear(x, self.w)))


@pytest.mark.parametrize("order", ["one call", "parameters first", "layers first"])
def test_a_parameter_and_its_owners_children_all_take_adapters(order: str) -> None:
    # The host stands in for the owner; the owner's children, replaced by LoRA layers or
    # hosts of their own before or after, are the ones its forward calls.
    torch.manual_seed(0)
    model = nn.Sequential(Block().double())
    plain = copy.deepcopy(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    params, layers = ["0.w", "0.sub.v"], ["0.fc"]
    if order == "one call":
        names = lp.inject_lora(model, target=layers, target_parameters=params, rank=2)
    elif order == "parameters first":
        names = lp.inject_lora(model, target_parameters=params, rank=2)
        names += lp.inject_lora(model, target=layers, rank=2, name="second")
    else:
        names = lp.inject_lora(model, target=layers, rank=2)
        names += lp.inject_lora(model, target_parameters=params, rank=2, name="second")
    assert sorted(names) == ["0.fc", "0.sub.v", "0.w"]
    randomize_adapters(model)
    lp.set_adapter(model, lp.adapter_names(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and sum(len(lp.adapter_state_dict(model, n))
                                       for n in lp.adapter_names(model)) == 6
    model.eval()
    unmerged = model(x)
    lp.merge(model)
    # Merging wrote every ΔW, and the output did not move: the forward computed them all.
    assert_close(model(x), unmerged)
    for key, value in plain.state_dict().items():
        assert key.endswith("bias") or not torch.equal(model.state_dict()[key], value), key
    lp.unload(model)
    assert type(model[0]) is Block and type(model[0].sub) is Sub
    assert type(model[0].fc) is nn.Linear
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_parent_reading_an_adapted_parameter_sees_the_adapter() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(self.proj(x), self.proj.weight.t())

    torch.manual_seed(0)
    model = nn.Sequential(Tied().double())
    x = torch.randn(2, 4, dtype=torch.float64)
    lp.inject_lora(model, target_parameters="0.proj.weight", rank=2)
    randomize_adapters(model)
    unmerged = model(x)
    lp.merge(model)
    assert_close(model(x), unmerged)


def test_a_host_follows_tensors_assigned_by_load_state_dict() -> None:
    model = nn.Sequential(ParamLinear(3, 4))
    lp.inject_lora(model, target_parameters="0.weight", rank=2)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items() if "lora" not in k}
    model.load_state_dict(new, strict=False, assign=True)
    x = torch.randn(2, 3)
    with lp.disable_adapters(model):
        torch.testing.assert_close(model(x), x @ new["0.weight"] + new["0.bias"])


@pytest.mark.parametrize("kwargs", [{"dora": True}, {"lora_bias": True}, {"init": "pissa"}])
def test_parameter_options_beyond_plain_lora_are_refused(kwargs: dict) -> None:
    model = nn.Sequential(ParamLinear(3, 4))
    with pytest.raises(lp.ConfigError, match=r"'0.weight' is a bare parameter, which takes "
                                             r"plain LoRA adapters.*received"):
        lp.inject_lora(model, target_parameters="0.weight", rank=2, **kwargs)
    assert type(model[0]) is ParamLinear


def test_save_merged_writes_a_parameter_under_its_own_key(tmp_path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.Sequential(Experts(2, 3, 4, transposed=False))
    plain = copy.deepcopy(model)
    lp.inject_lora(model, target_parameters="0.weight", rank=2)
    randomize_adapters(model)
    x = torch.randn(2, 5, 3)
    lp.save_merged(model, tmp_path / "merged.safetensors")
    state = load_file(tmp_path / "merged.safetensors")
    assert sorted(state) == ["0.weight"]
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), model(x))


def test_save_merged_with_parameters_that_are_views_of_one_storage(tmp_path) -> None:
    from safetensors.torch import load_file

    class Custom(nn.Module):
        def __init__(self, w: torch.Tensor) -> None:
            super().__init__()
            self.w = nn.Parameter(w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.w)

    torch.manual_seed(0)
    flat = torch.randn(32)  # as after loading a checkpoint whose tensors share storage
    model = nn.Sequential(Custom(flat[:16].view(4, 4)), Custom(flat[16:].view(4, 4)))
    kept = model[0].w.detach().clone()
    lp.inject_lora(model, target_parameters="1.w", rank=2)
    randomize_adapters(model)
    x = torch.randn(2, 4)
    lp.save_merged(model, tmp_path / "merged.safetensors")
    state = load_file(tmp_path / "merged.safetensors")
    assert torch.equal(state["0.w"], kept)
    plain = nn.Sequential(Custom(torch.zeros(4, 4)), Custom(torch.zeros(4, 4)))
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), model(x))


def test_saving_a_parameter_peft_cannot_read_warns(tmp_path) -> None:
    from strategies import OwnConv

    model = nn.Sequential(OwnConv(2, 3, 3))
    lp.inject_lora(model, target_parameters="0.kernel", rank=2)
    with pytest.warns(lp.LoRAWarning, match=r"\['0.kernel'\] have more than 3 dimensions; "
                                             r"PEFT's target_parameters takes 2 or 3"):
        lp.save_adapter(model, tmp_path / "a")
    lp.load_adapter(nn.Sequential(OwnConv(2, 3, 3)), tmp_path / "a")  # loraplug reads it
