"""inject_lora and unload: validation first, keys kept, objects restored, modules portable."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, delta
from strategies import randomize_adapters
from torch import nn

import loraplug as lp


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
        nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3),
    )


def snapshot(model: nn.Module) -> tuple:
    """Everything a failed call must leave as it was."""
    return (
        [(n, type(m), id(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, p.requires_grad) for n, p in model.named_parameters()],
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2] == after[2]


X = torch.randn(2, 3, 6, 6)


# ---------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be a positive int; received 0"),
        ({"rank": 2.0}, r"rank must be a positive int; received 2.0"),
        ({"rank": True}, r"rank must be a positive int; received True"),
        ({"rank": 2, "alpha": 0}, r"alpha must be a finite number > 0; received 0"),
        ({"rank": 2, "alpha": float("nan")}, r"alpha must be a finite number > 0; received nan"),
        ({"rank": 2, "dropout": 1.0}, r"dropout must be a number in \[0, 1\); received 1.0"),
        ({"rank": 2, "dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"rank": 2, "name": "a.b"}, r"adapter name must be a non-empty string without dots"),
        ({"rank": 2, "name": ""}, r"adapter name must be a non-empty string without dots"),
        ({"rank": 2, "name": "keys"}, r"nn.ParameterDict .*received 'keys'"),
        ({"rank": 2, "name": "training"}, r"adapter name must be .*received 'training'"),
        ({"rank": 2, "name": 3}, r"adapter name must be a non-empty string .*received 3"),
        ({"rank": 2, "init": "xavier"}, r"init must be one of \['kaiming'.*received 'xavier'"),
        ({"rank": 2, "use_rslora": "yes"}, r"use_rslora must be True or False; received 'yes'"),
        ({"rank": 2, "freeze_base": 1}, r"freeze_base must be True or False; received 1"),
    ],
)
def test_bad_hyperparameters_raise_config_error_and_change_nothing(kwargs, match) -> None:
    model = small_net()
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=match):
        lp.inject_lora(model, target=nn.Linear, **kwargs)
    assert_same(before, snapshot(model))


def test_grouped_conv_takes_any_rank() -> None:
    # A (r, in/g, k…) shared by the groups and B (out, r, 1…): no rank is refused.
    model = small_net()
    assert lp.inject_lora(model, target=[nn.Linear, nn.Conv2d], rank=3) == ["0", "2", "4", "6"]
    assert model[2].lora_A["default"].shape == (3, 2, 3, 3)
    assert model[2].lora_B["default"].shape == (4, 3, 1, 1)


def test_duplicate_adapter_name_is_refused_and_nothing_changes() -> None:
    model = small_net()
    lp.inject_lora(model, target="4", rank=2)
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=r"'4' already has an adapter named 'default'"):
        lp.inject_lora(model, target=["4", "6"], rank=2)
    assert_same(before, snapshot(model))


def test_rank_larger_than_useful_warns() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(lp.LoRAWarning, match=r"0 \(rank 4, at most 2\)"):
        lp.inject_lora(model, target="0", rank=4)


def test_meta_device_layer_is_refused() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(lp.StateError, match=r"'0' has tensors on the meta device.*to_empty"):
        lp.inject_lora(model, target="0", rank=2)
    assert type(model[0]) is nn.Linear


def test_uninitialised_lazy_layer_is_refused() -> None:
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(lp.StateError, match=r"'0' is an uninitialised lazy module.*forward pass"):
        lp.inject_lora(model, target="0", rank=2)
    model(torch.randn(1, 3))  # now a plain Linear(3, 4)
    assert lp.inject_lora(model, target="0", rank=2) == ["0"]


def test_multihead_attention_out_proj_is_adapted_through_the_attention() -> None:
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    assert lp.inject_lora(model, target=nn.Linear, rank=2) == ["attn.out_proj"]
    assert type(model.attn) is lp.LoRAMultiheadAttention
    assert type(model.attn.out_proj) is lp.LoRALinear
    randomize_adapters(model)
    x = torch.randn(3, 2, 8)
    adapted = model.attn(x, x, x)[0]
    with lp.disable_adapters(model):
        assert not torch.allclose(model.attn(x, x, x)[0], adapted)


def test_transformer_layer_fast_path_stays_off_while_adapters_are_live() -> None:
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    assert torch.backends.mha.get_fastpath_enabled()
    lp.inject_lora(model, target=["*.linear1", "*.linear2"], rank=2)
    randomize_adapters(model)
    model.eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        adapted = model(x)
        with lp.disable_adapters(model):
            assert not torch.allclose(model(x), adapted)  # the adapters take effect in eval
        lp.merge(model)
        torch.testing.assert_close(model(x), adapted)


def test_rank_warning_as_error_changes_nothing() -> None:
    import warnings

    model = nn.Sequential(nn.Linear(3, 2))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lp.LoRAWarning)
        with pytest.raises(lp.LoRAWarning, match="exceeds the rank"):
            lp.inject_lora(model, target="0", rank=4)
    assert_same(before, snapshot(model))


def test_gaussian_init_draws_a_with_std_one_over_rank_and_zero_b() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    lp.inject_lora(model, target="0", rank=4, init="gaussian")
    a, b = model[0].lora_A["default"], model[0].lora_B["default"]
    assert torch.count_nonzero(b) == 0
    assert abs(a.std().item() - 1 / 4) < 0.02 and abs(a.mean().item()) < 0.03  # 2048 draws


def test_merged_layer_refuses_a_new_adapter() -> None:
    model = small_net()
    lp.inject_lora(model, target="4", rank=2)
    lp.merge(model)
    with pytest.raises(lp.StateError, match=r"'4' has \['default'\] merged; call .*unmerge"):
        lp.inject_lora(model, target="4", rank=2, name="b")


# ---------------------------------------------------------------- what inject does
def test_inject_returns_sorted_names_and_freezes_base() -> None:
    model = small_net()
    assert lp.inject_lora(model, target=[nn.Linear, "0"], rank=2) == ["0", "4", "6"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{m}.lora_{ab}.default" for m in "046" for ab in "AB")


def test_freeze_base_false_leaves_requires_grad_alone() -> None:
    model = small_net()
    lp.inject_lora(model, target="4", rank=2, freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_keeps_every_base_key_and_adds_lora_beside_them() -> None:
    model = small_net()
    base_state = copy.deepcopy(model.state_dict())
    lp.inject_lora(model, target=[nn.Linear, nn.Conv2d], rank=2)
    keys = list(model.state_dict())
    lora = {k for k in keys if ".lora_" in k}
    assert set(keys) - lora == set(base_state)
    assert lora == {f"{m}.lora_{ab}.default" for m in "0246" for ab in "AB"}
    # A base checkpoint loads into the injected model (adapters untouched: strict=False).
    result = model.load_state_dict(base_state, strict=False)
    assert sorted(result.missing_keys) == sorted(lora) and not result.unexpected_keys


def test_unload_restores_original_objects_and_bit_identical_state() -> None:
    model = small_net()
    originals = {n: m for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    lp.inject_lora(model, target=[nn.Linear, nn.Conv2d], rank=2)
    randomize_adapters(model)
    lp.unload(model)
    assert {n: id(m) for n, m in model.named_modules()} == {n: id(m) for n, m in originals.items()}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_unload_after_merge_and_unmerge_is_close_to_original() -> None:
    model = small_net()
    state = copy.deepcopy(model.state_dict())
    lp.inject_lora(model, target=nn.Linear, rank=2)
    randomize_adapters(model)
    lp.merge(model)
    lp.unload(model, merge=False)
    for k, v in state.items():
        assert_close(model.state_dict()[k], v)


def test_unload_merge_gives_plain_model_computing_adapted_function() -> None:
    model = small_net()
    lp.inject_lora(model, target=[nn.Linear, nn.Conv2d], rank=2)
    randomize_adapters(model)
    expected = model(X)
    lp.unload(model, merge=True)
    assert not any(isinstance(m, lp.LoRALayer) for m in model.modules())
    assert not any("lora" in k for k in model.state_dict())
    assert_close(model(X), expected)
    # The original architecture loads the merged checkpoint.
    fresh = small_net()
    fresh.load_state_dict(model.state_dict())
    assert_close(fresh(X), expected)


def test_shared_module_is_wrapped_at_every_path() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    lp.inject_lora(model, target="0", rank=2)
    assert model[0] is model[2]
    assert isinstance(model[2], lp.LoRALinear)
    lp.unload(model)
    assert model[0] is shared and model[2] is shared


def test_second_adapter_is_added_but_not_activated() -> None:
    model = small_net()
    lp.inject_lora(model, target="4", rank=2)
    lp.inject_lora(model, target=["4", "6"], rank=3, name="b")
    assert lp.adapter_names(model) == ["b", "default"]
    assert lp.active_adapters(model) == ["default"]
    assert model[6].adapter_names == ("b",) and model[6]._live == ()
    lp.set_adapter(model, "b")
    assert model[4]._live == ("b",) and model[6]._live == ("b",)


# ---------------------------------------------------------------- subclasses
class ScaledInput(nn.Linear):
    """A Linear subclass whose forward changes its input first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.tanh(x))


class PaddedConv(nn.Conv2d):
    """A 'static same' conv that pads inside forward (as some ported models do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1), mode="replicate"))


class PlainSubclass(nn.Linear):
    """A subclass that does not change the math."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subclass_with_own_forward_is_computed_through_the_weight(dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledInput(5, 3), PaddedConv(1, 2, 3)).to(dtype)
    x_lin, x_conv = torch.randn(4, 5, dtype=dtype), torch.randn(1, 1, 5, 5, dtype=dtype)
    base_lin, base_conv = model[0](x_lin), model[1](x_conv)
    lp.inject_lora(model, target=["0", "1"], rank=1)
    assert model[0].through_weight and model[1].through_weight
    assert torch.equal(model[0](x_lin), base_lin) and torch.equal(model[1](x_conv), base_conv)
    randomize_adapters(model)
    lin, conv = model[0], model[1]
    w_lin = lin.weight + delta("linear", lin.lora_A["default"], lin.lora_B["default"], 1.0)
    w_conv = conv.weight + delta("conv", conv.lora_A["default"], conv.lora_B["default"], 1.0)
    w_lin, w_conv = w_lin.to(dtype), w_conv.to(dtype)
    ref_lin = F.linear(torch.tanh(x_lin), w_lin, lin.bias)
    ref_conv = F.conv2d(F.pad(x_conv, (1, 1, 1, 1), mode="replicate"), w_conv, conv.bias)
    assert_close(model[0](x_lin), ref_lin)
    assert_close(model[1](x_conv), ref_conv)
    lp.merge(model)
    model.eval()  # a merged layer in a training forward warns (it cannot train)
    assert_close(model[0](x_lin), ref_lin)
    assert_close(model[1](x_conv), ref_conv)


def test_subclass_with_own_forward_refuses_dropout() -> None:
    model = nn.Sequential(ScaledInput(5, 3))
    with pytest.raises(lp.ConfigError,
                       match=r"whose forward differs from nn.Linear's.*dropout=0.0"):
        lp.inject_lora(model, target="0", rank=1, dropout=0.1)


def test_plain_subclass_takes_the_fast_path() -> None:
    model = nn.Sequential(PlainSubclass(5, 3))
    lp.inject_lora(model, target=nn.Linear, rank=1)
    assert isinstance(model[0], lp.LoRALinear) and not model[0].through_weight
    assert model[0].in_features == 5  # base attributes read through


def test_user_registered_layer_wins_over_parent() -> None:
    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    @lp.register_lora_layer(Doubling)
    class LoRADoubling(lp.LoRALinear):
        def base_forward(self, x):
            return 2 * super().base_forward(x)

        def lora_forward(self, x, name):
            return 2 * super().lora_forward(x, name)

    model = nn.Sequential(Doubling(3, 3))
    lp.inject_lora(model, target="0", rank=1)
    assert type(model[0]) is LoRADoubling and not model[0].through_weight
    randomize_adapters(model)
    x = torch.randn(2, 3)
    w = model[0].weight + delta("linear", model[0].lora_A["default"], model[0].lora_B["default"],
                                1.0).float()
    assert_close(model(x), 2 * F.linear(x, w, model[0].bias))


def test_register_rejects_non_modules_and_non_layers() -> None:
    with pytest.raises(lp.ConfigError, match=r"expected an nn.Module subclass"):
        lp.register_lora_layer(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(lp.ConfigError, match=r"expected a subclass of loraplug.LoRALayer"):
        lp.register_lora_layer(nn.Linear)(object)  # type: ignore[arg-type]


def test_the_layer_for_a_module_wraps_it_without_placing_it() -> None:
    from loraplug._registry import lora_layer_for

    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    layer = lora_layer_for(model[0])
    assert isinstance(layer, lp.LoRALinear) and layer.base_layer is model[0]
    assert type(model[0]) is nn.Linear and lora_layer_for(layer) is layer
    with pytest.raises(lp.TargetError, match=r"nn.LayerNorm has no LoRA layer; supported: "
                                             r"\[.*'nn.Linear'.*register_lora_layer"):
        lora_layer_for(model[1])


# ---------------------------------------------------------------- portability
def test_pickle_deepcopy_and_torch_save_round_trip() -> None:
    model = small_net()
    lp.inject_lora(model, target=[nn.Linear, "0"], rank=2, dropout=0.1)
    randomize_adapters(model)
    model.eval()
    expected = model(X)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(buffer, weights_only=False)):  # our own bytes, not a user file
        assert torch.equal(clone(X), expected)
        # Shared tensors stay shared: the wrapped module sees the layer's weight.
        assert clone[4].base_layer.weight is clone[4].weight
        lp.unload(clone, merge=True)
        assert_close(clone(X), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype_moves_adapters_with_the_base(dtype) -> None:
    model = small_net()
    lp.inject_lora(model, target=[nn.Linear, "0"], rank=2)
    model.to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model[4].base_layer.weight is model[4].weight
    lp.unload(model)
    assert model[4].weight.dtype == dtype


def test_bf16_model_injects_bf16_adapters_and_merges_in_float32() -> None:
    model = small_net().to(torch.bfloat16)
    lp.inject_lora(model, target=nn.Linear, rank=2)
    assert model[4].lora_A["default"].dtype == torch.bfloat16
    randomize_adapters(model)
    out = model(X.to(torch.bfloat16))
    lp.merge(model)
    with torch.no_grad():  # a merged layer in a training forward warns (it cannot train)
        assert_close(model(X.to(torch.bfloat16)), out, scale=max(1.0, out.abs().max().item()))
