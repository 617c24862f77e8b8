"""LoRA on real bitsandbytes layers (CPU): Linear4bit (nf4/fp4, double quantization, float32
and bfloat16 compute) and Linear8bitLt.

The reference is independent of loraplug: the original quantized layer's own output plus
the low-rank branch in float64, ``base(x) + s · B A x``, and for float32 compute the dense
``F.linear(x, dequantize(W) + ΔW)`` in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from quantized import BNB_CONFIGS, BnbConfig, bnb_layer, quantize_bnb
from reference import assert_close
from safetensors.torch import load_file
from torch import nn

import loraplug as lp

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (loraplug[bnb])")


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """W as bitsandbytes itself dequantizes it (not through loraplug)."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scb = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * scb.float()[:, None] / 127


def _randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _branch(layer: lp.LoRALayer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    a, b = layer.lora_A[name].double(), layer.lora_B[name].double()
    return layer.scaling[name] * F.linear(F.linear(x.double(), a), b)


def _tolerance(config: BnbConfig, dtype: torch.dtype = torch.float32) -> torch.dtype:
    # bfloat16 compute, bfloat16 inputs and int8 activations round the output.
    exact = config.bits == 4 and config.compute_dtype == torch.float32 and dtype == torch.float32
    return torch.float32 if exact else torch.bfloat16


@st.composite
def bnb_cases(draw: st.DrawFn) -> tuple[BnbConfig, nn.Sequential, torch.Tensor, int, float]:
    config = draw(st.sampled_from(BNB_CONFIGS))
    in_f, out_f = draw(st.sampled_from([64, 128])), draw(st.sampled_from([64, 128]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    linear = nn.Linear(in_f, out_f, bias=draw(st.booleans()))
    model = nn.Sequential(bnb_layer(linear, config))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    x = torch.randn(*lead, in_f, dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])))
    return config, model, x, draw(st.integers(1, 8)), draw(st.sampled_from([1.0, 8.0]))


@given(bnb_cases(), st.sampled_from(["train", "eval"]))
def test_fresh_injection_is_bit_identical_and_adapted_output_matches_reference(case, mode):
    config, model, x, rank, alpha = case
    getattr(model, mode)()
    base = copy.deepcopy(model[0])
    expected = base(x)
    lp.inject_lora(model, target="0", rank=rank, alpha=alpha)
    layer = model[0]
    assert torch.equal(model(x), expected)
    assert layer.lora_A["default"].shape == (rank, layer.in_features)
    assert layer.lora_B["default"].shape == (layer.out_features, rank)
    assert layer.lora_A["default"].dtype == torch.float32
    _randomize(model)
    y = model(x)
    assert y.dtype == expected.dtype
    ref = base(x).double() + _branch(layer, x)
    assert_close(y, ref, _tolerance(config, x.dtype), scale=max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("config", [c for c in BNB_CONFIGS if c.bits == 4
                                    and c.compute_dtype == torch.float32], ids=str)
def test_float32_compute_equals_the_dense_reference(config: BnbConfig) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(128, 64), config))
    x = torch.randn(3, 5, 128)
    lp.inject_lora(model, target="0", rank=4, alpha=8)
    _randomize(model)
    layer = model[0]
    dense = _dequantized(layer).double() + 2.0 * layer.lora_B["default"].double() \
        @ layer.lora_A["default"].double()
    ref = F.linear(x.double(), dense, layer.bias.double())
    assert_close(model(x), ref, torch.float32, scale=ref.abs().max().item())


@pytest.mark.parametrize("config", BNB_CONFIGS, ids=str)
def test_state_dict_keys_and_stored_weight_are_the_base_models(config: BnbConfig) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp.inject_lora(model, target="0", rank=2)
    after = model.state_dict()
    assert set(after) == set(before) | {"0.lora_A.default", "0.lora_B.default"}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # Loading goes through the base module's own loader: it reports what bitsandbytes
    # reports (its 4-bit statistics are loaded by transformers, not by load_state_dict).
    plain = nn.Sequential(bnb_layer(nn.Linear(64, 64), config))
    torch.manual_seed(0)  # the same statistics, so that the loaded weight means the same
    other = nn.Sequential(bnb_layer(nn.Linear(64, 64), config))
    lp.inject_lora(other, target="0", rank=2)
    _randomize(model, seed=3)
    theirs = plain.load_state_dict(before, strict=False)
    ours = other.load_state_dict(model.state_dict(), strict=False)
    assert ours.unexpected_keys == theirs.unexpected_keys and not ours.missing_keys
    x = torch.randn(2, 64)
    assert torch.equal(other(x), model(x))


@pytest.mark.parametrize("config", BNB_CONFIGS, ids=str)
def test_training_moves_only_the_adapters_with_the_reference_gradients(config: BnbConfig) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 128), config), nn.GELU(),
                          bnb_layer(nn.Linear(128, 64), config)).train()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    lp.inject_lora(model, target=["0", "2"], rank=4, alpha=8)
    _randomize(model)
    x, target = torch.randn(6, 64), torch.randn(6, 64)
    loss = F.mse_loss(model(x), target)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {f"{i}.lora_{m}.default" for i in (0, 2) for m in "AB"}
    if _tolerance(config) == torch.float32:  # the same step through dense W + ΔW in float64
        leaves = [model[i].lora_A["default"].detach().double().requires_grad_()
                  for i in (0, 2)] + [model[i].lora_B["default"].detach().double()
                                      .requires_grad_() for i in (0, 2)]

        def dense(i: int, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            w = _dequantized(model[i]).double() + model[i].scaling["default"] * b @ a
            return F.linear(h, w, model[i].bias.double())
        out = dense(2, F.gelu(dense(0, x.double(), leaves[0], leaves[2])), leaves[1], leaves[3])
        F.mse_loss(out, target.double()).backward()
        for leaf, name in zip(leaves, ["0.lora_A", "2.lora_A", "0.lora_B", "2.lora_B"]):
            assert_close(grads[f"{name}.default"], leaf.grad, torch.float32,
                         scale=max(1.0, leaf.grad.abs().max().item()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = loss.item()
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
    assert loss.item() < first
    now = model.state_dict()  # the quantized weights untouched (bitsandbytes itself casts
    assert all(torch.equal(now[k], v) for k, v in stored.items() if "bias" not in k)  # biases)


@pytest.mark.parametrize("config", [BNB_CONFIGS[0], BNB_CONFIGS[-1]], ids=str)
def test_merge_is_refused_without_requantize_and_nothing_changes(config: BnbConfig) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), config), nn.Linear(64, 64))
    lp.inject_lora(model, target=["0", "1"], rank=2)
    _randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lp.StateError, match=r"merge: \['0'\] hold quantized weights.*"
                                            "requantize=True.*save_merged"):
        lp.merge(model)
    with pytest.raises(lp.StateError, match=r"unload.*hold quantized weights"):
        lp.unload(model, merge=True)
    with pytest.raises(lp.StateError, match=r"stored quantized .* requantize=True"):
        model[0].merge()
    with pytest.raises(lp.ConfigError, match="requantize must be True or False"):
        lp.merge(model, requantize=1)
    assert not model[0].merged and not model[1].merged
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("config", BNB_CONFIGS, ids=str)
def test_requantizing_merge_reports_its_error_and_unmerge_is_exact(config, safe) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(128, 64), config), nn.Linear(64, 64)).eval()
    lp.inject_lora(model, target=["0", "1"], rank=4, alpha=8)
    _randomize(model)
    x = torch.randn(4, 128)
    unmerged, unmerged_0 = model(x), model[0](x)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    expected = (_dequantized(model[0]) + model[0].delta_weight("default")).double()

    errors = lp.merge(model, safe=safe, requantize=True)
    assert set(errors) == {"0"} and model[0].merged and model[1].merged
    now = _dequantized(model[0]).double()
    assert errors["0"] == pytest.approx((now - expected).abs().max().item(), rel=1e-6)
    assert 0 < errors["0"] < 0.5 * expected.abs().max().item()
    assert lp.merge(model, requantize=True) == {}  # already merged: nothing more
    with torch.no_grad():  # merged: the layer's own forward on the requantized weight
        assert torch.equal(model[0](x), model[0].base_layer(x))
    if _tolerance(config) == torch.float32:  # each weight moved by at most the error
        bound = errors["0"] * x.abs().sum(-1).max().item()
        assert (model(x) - unmerged).abs().max().item() <= bound * (1 + 1e-4) + 1e-5

    lp.unmerge(model)
    assert not model[0].merged
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in stored.items() if k.startswith("0."))
    assert torch.equal(model[0](x), unmerged_0)  # the plain layer "1" unmerges to a few ulps


def test_unload_after_requantizing_merge_keeps_the_requantized_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), BNB_CONFIGS[0]))
    original = model[0]
    lp.inject_lora(model, target="0", rank=2)
    _randomize(model)
    lp.merge(model, requantize=True)
    x = torch.randn(2, 64)
    with torch.no_grad():  # merged adapters do not train
        merged = model(x)
        assert lp.unload(model, merge=True)[0] is original
        assert torch.equal(model(x), merged)


@pytest.mark.parametrize("config", BNB_CONFIGS, ids=str)
def test_save_merged_writes_full_precision_weights_a_plain_model_loads(config, tmp_path) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    model = quantize_bnb(plain, config)
    lp.inject_lora(model, target=["0", "2"], rank=4)  # "3" stays quantized, unadapted
    _randomize(model)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    lp.save_merged(model, tmp_path / "merged.safetensors")
    state = load_file(tmp_path / "merged.safetensors")
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)  # strict: same keys, same shapes
    for i in ("0", "2"):
        expected = _dequantized(model[int(i)]) + model[int(i)].delta_weight("default")
        torch.testing.assert_close(state[f"{i}.weight"], expected.to(state[f"{i}.weight"].dtype))
    torch.testing.assert_close(state["3.weight"], _dequantized(model[3]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    x = torch.randn(3, 128)
    if _tolerance(config) == torch.float32:
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    # merged (requantized) layers are written dequantized as well
    lp.merge(model, requantize=True)
    lp.save_merged(model, tmp_path / "requantized.safetensors")
    state = load_file(tmp_path / "requantized.safetensors")
    torch.testing.assert_close(state["0.weight"], _dequantized(model[0]))


def test_unload_returns_the_original_quantized_modules_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = quantize_bnb(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), BNB_CONFIGS[-1])
    originals = list(model)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    lp.inject_lora(model, target=nn.Linear, rank=2)
    _randomize(model)
    model(torch.randn(2, 64))
    lp.unload(model)
    assert list(model) == originals
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())


def test_adapter_state_switching_and_mixed_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), BNB_CONFIGS[1]))  # bfloat16 compute
    base = copy.deepcopy(model[0])
    lp.inject_lora(model, target="0", rank=2, name="a")
    lp.inject_lora(model, target="0", rank=3, name="b")
    _randomize(model)
    x = torch.randn(3, 64)
    with lp.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    lp.set_adapter(model, "b")
    only_b = model(x)
    lp.set_adapter(model, "a")
    only_a = model(x)
    with lp.adapter_per_sample(model, ["a", None, "b"]):
        mixed = model(x)
    for row, expected in ((0, only_a), (1, base(x)), (2, only_b)):
        torch.testing.assert_close(mixed[row], expected[row], rtol=1e-5, atol=1e-5)
    lp.delete_adapter(model, "a")
    assert lp.adapter_names(model) == ["b"]


def test_summary_shows_logical_shapes_formats_and_bytes_per_weight() -> None:
    torch.manual_seed(0)
    model = quantize_bnb(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64),
                                       nn.Linear(64, 64)), BnbConfig(4, "nf4", True),
                         skip=("2",))
    model[1] = bnb_layer(nn.Linear(128, 64), BnbConfig(8))
    lp.inject_lora(model, target=nn.Linear, rank=2)
    rows = {row.name: row for row in lp.summary(model).layers}
    assert rows["0"].shape == (128, 256) and rows["0"].weight == "bnb nf4 dq"
    # 4 bits per weight, one 8-bit absmax per 64, 32-bit second-level scales per 256 blocks
    assert 0.5 + 1 / 64 < rows["0"].bytes_per_weight < 0.5 + 1 / 64 + 0.05
    assert rows["1"].weight == "bnb int8" and rows["1"].bytes_per_weight == 1 + 4 / 128
    assert rows["2"].weight == "float32" and not rows["2"].quantized
    text = str(lp.summary(model))
    assert "128×256" in text and "bnb nf4 dq (0.5" in text and "bnb int8 (1.03)" in text
    assert lp.summary(model).total == 256 * 128 + 128 + 128 * 64 + 64 + 64 * 64 + 64 + \
        lp.summary(model).lora_parameters


def test_a_layer_that_is_not_quantized_yet_reads_as_float() -> None:
    # Before bitsandbytes moves it to a device a Linear4bit holds its float weight.
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
    model = nn.Sequential(layer)
    lp.inject_lora(model, target="0", rank=2)
    assert model[0].lora_A["default"].shape == (2, 64)
    torch.testing.assert_close(model[0].merged_weight(), layer.weight.data)
    size = model[0].weight_format.bytes_per_weight(layer)
    assert size == pytest.approx(0.5 + 1 / 64 + 4 / 64 / 256)
    with pytest.raises(lp.StateError, match="not quantized yet"):
        lp.merge(model, requantize=True)
    assert not model[0].merged


def test_a_weight_that_is_not_quantized_is_refused_by_the_quantized_layer() -> None:
    from loraplug._bnb import LoRALinear4bit

    layer = bnb.nn.Linear4bit(64, 64)
    layer.weight = nn.Parameter(torch.zeros(64, 64))
    with pytest.raises(lp.ConfigError, match="does not read as a quantized weight"):
        LoRALinear4bit(layer, bnb.nn.Linear4bit)


@pytest.mark.parametrize("config", [c for c in BNB_CONFIGS if c.bits == 4], ids=str)
def test_reading_a_weight_bitsandbytes_repacked_for_inference_changes_nothing(config) -> None:
    # On CPUs with AVX512-BF16 an eval forward without gradients repacks the weight for the
    # inference kernel; reading (merged_weight) and saving (state_dict) afterwards must
    # neither change what the layer computes nor read scrambled scales.
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(128, 64), config))
    original = _dequantized(model[0])
    lp.inject_lora(model, target="0", rank=2)
    model.eval()
    x = torch.randn(2, 128)
    with torch.no_grad():
        first = model(x)
        dense = model[0].merged_weight()
        model.state_dict()
        assert torch.equal(model(x), first)
    torch.testing.assert_close(dense, original, rtol=1e-2, atol=1e-2)  # scales in bfloat16


@pytest.mark.parametrize("config", [c for c in BNB_CONFIGS if c.bits == 4], ids=str)
def test_training_after_an_inference_forward_gets_its_gradients(config) -> None:
    # An eval forward without gradients lets bitsandbytes pack the weight for a kernel
    # without backward; training afterwards must still differentiate through the layer.
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), config), bnb_layer(nn.Linear(64, 64),
                                                                           config))
    lp.inject_lora(model, target=["0", "1"], rank=2)
    _randomize(model)
    x = torch.randn(3, 64)
    fresh = copy.deepcopy(model).train()
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    model(x).pow(2).sum().backward()
    fresh(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if p.requires_grad:  # packed scales are bfloat16: the same gradients to that precision
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2, msg=name)


def test_layer_level_merge_refusals() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), BNB_CONFIGS[0]))
    lp.inject_lora(model, target="0", rank=2)
    layer = model[0]
    with lp.disable_adapters(model), pytest.raises(lp.StateError, match="adapters are disabled"):
        layer.merge(requantize=True)
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(lp.StateError, match="NaN or inf"):
        layer.merge(safe=True, requantize=True)
    with pytest.raises(lp.StateError, match="NaN or inf"):
        lp.merge(model, safe=True, requantize=True)
    assert not layer.merged


def test_copies_and_device_moves_keep_a_merged_layer_exact() -> None:
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(bnb_layer(nn.Linear(64, 64), BNB_CONFIGS[0]),
                          bnb_layer(nn.Linear(64, 64), BNB_CONFIGS[-1]))
    lp.inject_lora(model, target=["0", "1"], rank=2)
    _randomize(model)
    x = torch.randn(2, 64)
    unmerged = model(x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(other(x), unmerged)
    lp.merge(model, requantize=True)
    model.to("cpu").float()  # the kept weights follow; nothing is cast
    lp.unmerge(model)
    assert torch.equal(model(x), unmerged)


def test_the_targets_command_shows_logical_shapes_and_bytes_per_weight(capsys) -> None:
    from loraplug._cli import main

    assert main(["targets", "quantized:small_bnb_model", "--target", "0", "--target", "2",
                 "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "stored (bytes/w)" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("*")}
    assert "64×128" in lines["0"] and "bnb nf4 dq 0.6" in lines["0"]
    assert "768" in lines["0"]  # r·(in + out) = 4·(128 + 64)
    assert "float32 4" in next(line for line in out.splitlines() if line.split()[:1] == ["3"])


class T5Dense(nn.Module):
    """Like transformers' T5DenseActDense: its forward reads ``wo.weight`` to choose a dtype."""

    def __init__(self, wo: nn.Module) -> None:
        super().__init__()
        self.wi, self.wo = nn.Linear(64, 128, bias=False), wo

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wi(h))
        if self.wo.weight.is_floating_point() and h.dtype != self.wo.weight.dtype:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


@pytest.mark.parametrize("config", [BNB_CONFIGS[0], BNB_CONFIGS[-1]], ids=str)
def test_a_module_reading_a_quantized_weight_gets_the_stored_one(config: BnbConfig) -> None:
    torch.manual_seed(0)
    wo = bnb_layer(nn.Linear(128, 64, bias=False), config)
    model = nn.Sequential(T5Dense(wo))
    stored = wo.weight
    lp.inject_lora(model, target="0.wo", rank=4)
    randomize = model[0].wo.lora_B["default"]
    with torch.no_grad():
        randomize.normal_()
    x = torch.randn(2, 64)
    out = model(x)  # the dtype checks read the stored weight; the adapter still counts
    assert model[0].wo.weight is stored
    with lp.disable_adapters(model):
        assert not torch.allclose(model(x), out)
