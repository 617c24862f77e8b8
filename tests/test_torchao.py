"""LoRA on nn.Linear layers whose weight torchao quantized (weight-only), on the CPU.

torchao keeps the layer an ``nn.Linear`` and swaps its weight for a tensor subclass; the
layer is recognised from the weight. The reference is the quantized layer's own output
plus the branch in float64, and ``F.linear`` on ``dequantize(W) + ΔW`` in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from safetensors.torch import load_file
from torch import nn

import loraplug as lp

torchao = pytest.importorskip("torchao", reason="torchao is not installed (loraplug[torchao])")
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerGroup,
    quantize_,
    to_nf4,
)


def _int8(model: nn.Module) -> None:
    quantize_(model, Int8WeightOnlyConfig())


def _int4(model: nn.Module) -> None:
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def _float8(model: nn.Module) -> None:
    quantize_(model, Float8WeightOnlyConfig())


def _nf4(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)


#: name -> (quantize in place, can be requantized)
FORMATS = {"int8": (_int8, True), "int4": (_int4, True), "float8": (_float8, False),
           "nf4": (_nf4, True)}


def _model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).to(dtype)
    FORMATS[kind][0](model)
    return model


def _randomize(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _dense(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") \
        else weight.dequantize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(FORMATS))
def test_forward_is_the_quantized_layer_plus_the_branch(kind: str, dtype: torch.dtype) -> None:
    model = _model(kind, dtype)
    x = torch.randn(3, 5, 256, dtype=dtype)
    base = copy.deepcopy(model)
    expected = base(x)
    assert lp.inject_lora(model, target=nn.Linear, rank=4, alpha=8) == ["0", "2"]
    layer = model[0]
    assert type(layer).__name__ == "LoRATorchaoLinear"
    # A and B in the weight's logical dtype: the compute dtype
    assert layer.lora_A["default"].shape == (4, 256) and layer.lora_A["default"].dtype == dtype
    assert torch.equal(model(x), expected)
    _randomize(model)
    h = F.gelu(F.linear(x.double(), _dense(base[0]).double() + layer.delta_weight("default")
                        .double(), base[0].bias.double()))
    ref = F.linear(h, _dense(base[2]).double() + model[2].delta_weight("default").double(),
                   base[2].bias.double())
    y = model(x)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, scale=max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("kind", list(FORMATS))
def test_training_reaches_only_the_adapters(kind: str) -> None:
    model = _model(kind)
    lp.inject_lora(model, target=nn.Linear, rank=4)
    _randomize(model)
    before = {k: _dense(m).clone() for k, m in (("0", model[0]), ("2", model[2]))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(8, 256), torch.randn(8, 256)
    losses = []
    for _ in range(4):
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{i}.lora_{m}.default" for i in "02" for m in "AB"}
    assert all(torch.equal(_dense(model[int(k)]), v) for k, v in before.items())


@pytest.mark.parametrize("kind", list(FORMATS))
def test_merge_requantizes_only_when_asked_and_unmerge_is_exact(kind: str) -> None:
    model = _model(kind)
    lp.inject_lora(model, target=nn.Linear, rank=4)
    _randomize(model)
    x = torch.randn(2, 256)
    unmerged = model(x)
    stored = [model[i].weight for i in (0, 2)]
    with pytest.raises(lp.StateError, match="hold quantized weights"):
        lp.merge(model)
    if not FORMATS[kind][1]:
        with pytest.raises(lp.StateError, match=r"cannot requantize '0': .*Float8Tensor"):
            lp.merge(model, requantize=True)
        assert not model[0].merged and model[0].weight is stored[0]
        return
    expected = [_dense(model[i]).double() + model[i].delta_weight("default").double()
                for i in (0, 2)]
    errors = lp.merge(model, requantize=True)
    assert sorted(errors) == ["0", "2"]
    for i, want in zip((0, 2), expected):
        assert type(model[i].weight) is type(stored[i // 2])  # the same format again
        got = (_dense(model[i]).double() - want).abs().max().item()
        assert errors[str(i)] == pytest.approx(got, rel=1e-5, abs=1e-7)
    lp.unmerge(model)
    assert [model[i].weight for i in (0, 2)] == stored
    assert torch.equal(model(x), unmerged)


def test_save_merged_writes_dense_weights_a_plain_model_loads(tmp_path) -> None:
    model = _model("int8")
    lp.inject_lora(model, target="0", rank=4)  # "2" stays quantized, unadapted
    _randomize(model)
    lp.save_merged(model, tmp_path / "merged.safetensors")
    state = load_file(tmp_path / "merged.safetensors")
    plain = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    plain.load_state_dict(state)
    torch.testing.assert_close(state["0.weight"], _dense(model[0]) +
                               model[0].delta_weight("default"))
    torch.testing.assert_close(state["2.weight"], _dense(model[2]))
    x = torch.randn(2, 256)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)


def test_summary_names_the_format_and_its_bytes_per_weight() -> None:
    model = _model("int4")
    lp.inject_lora(model, target="0", rank=2)
    row = lp.summary(model).layers[0]
    assert row.quantized and row.weight == "torchao IntxUnpackedToInt8Tensor int4"
    assert row.shape == (256, 256)
    # int4 values kept one per int8, a float32 scale and an int8 zero point per group of 32
    assert row.bytes_per_weight == pytest.approx(1 + 5 / 32)


def test_files_do_not_depend_on_the_quantization(tmp_path) -> None:
    model = _model("int8")
    lp.inject_lora(model, target=nn.Linear, rank=4)
    _randomize(model)
    lp.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    lp.load_adapter(dense, tmp_path)
    for key, value in lp.adapter_state_dict(model).items():
        assert torch.equal(lp.adapter_state_dict(dense)[key], value)


def test_a_layer_refuses_to_requantize_a_format_it_cannot_rebuild() -> None:
    model = _model("float8")
    lp.inject_lora(model, target="0", rank=2)
    with pytest.raises(lp.StateError, match=r"cannot requantize this layer's weight: .*Float8"):
        model[0].merge(requantize=True)
    assert not model[0].merged
