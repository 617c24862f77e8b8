"""Owners that read a LoRA layer's weight instead of calling it see W + ΔW.

Found in general, not from a list: Swin's attention, ``nn.MultiheadAttention``'s
``out_proj``, ``nn.TransformerEncoderLayer``'s fast path, and any module that computes
with a child's (or grandchild's) weight. Each is checked against the dense reference:
the owner's own forward in float64 on a copy whose weights hold W + ΔW.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from reference import assert_close, delta, dense_forward
from strategies import Case, conv_cases, linear_cases, randomize_adapters
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

import loraplug as lp


class Reader(nn.Module):
    """Computes with its child's weight without calling the child."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The geometry (padding, stride, ...) of the wrapped type; the weight read here.
        kind = getattr(self.layer, "base_layer", self.layer)
        return dense_forward(kind, self.layer.weight, x)


class Grandparent(nn.Module):
    """Reads a grandchild's weight: ``F.linear(x, self.block.proj.weight)``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.block.proj.weight, self.block.proj.bias)


def _adapted_copy(model: nn.Module, kinds: dict[str, str]) -> nn.Module:
    """A float64 copy of the unloaded model whose adapted weights hold W + ΔW."""
    plain = lp.unload(copy.deepcopy(model)).double()
    with torch.no_grad():
        for name, kind in kinds.items():
            layer = model.get_submodule(name)
            d = delta(kind, layer.lora_A["default"], layer.lora_B["default"],
                      layer.scaling["default"])
            plain.get_submodule(name).weight += d
    return plain


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item())


@given(linear_cases(torch.float64))
def test_a_module_reading_a_linear_weight_sees_the_adapter(case: Case) -> None:
    model = nn.Sequential(Reader(case.base))
    lp.inject_lora(model, target="0.layer", rank=case.rank, alpha=case.alpha)
    randomize_adapters(model)
    ref = _adapted_copy(model, {"0.layer": "linear"})(case.x)
    assert_close(model(case.x), ref, scale=_scale(ref))
    lp.merge(model)
    assert_close(model(case.x), ref, scale=_scale(ref))


@given(conv_cases(dtype=torch.float64))
def test_a_module_reading_a_conv_weight_sees_the_adapter(case: Case) -> None:
    model = nn.Sequential(Reader(case.base))
    lp.inject_lora(model, target="0.layer", rank=case.rank, alpha=case.alpha)
    randomize_adapters(model)
    layer = model[0].layer
    plain = lp.unload(copy.deepcopy(model)).double()
    with torch.no_grad():
        plain[0].layer.weight += delta("conv", layer.lora_A["default"], layer.lora_B["default"],
                                       layer.scaling["default"], case.groups)
    ref = plain(case.x)
    assert_close(model(case.x), ref, scale=_scale(ref))


def test_swin_attention_reading_qkv_and_proj_trains_and_merges() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2)).double()
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64)
    base = model(x)
    lp.inject_lora(model, target=["0.qkv", "0.proj"], rank=4)
    assert torch.equal(model(x), base)
    randomize_adapters(model)
    ref = _adapted_copy(model, {"0.qkv": "linear", "0.proj": "linear"})(x)
    out = model(x)
    assert_close(out, ref, scale=_scale(ref))
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora" in n)
    lp.merge(model)
    assert_close(model(x), ref, scale=_scale(ref))


def test_multihead_attention_reading_out_proj_sees_the_adapter() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert lp.inject_lora(model, target=nn.Linear, rank=2) == ["attn.out_proj"]
    randomize_adapters(model)
    ref = _adapted_copy(model, {"attn.out_proj": "linear"}).attn(x, x, x)[0]
    assert_close(model.attn(x, x, x)[0], ref, scale=_scale(ref))


@pytest.mark.parametrize("grad", [False, True])
def test_transformer_encoder_layer_fast_path_sees_the_adapter(grad: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                     batch_first=True)).eval()
    x = torch.randn(2, 5, 8)
    lp.inject_lora(model, target=["0.linear1", "0.linear2"], rank=2)
    randomize_adapters(model)
    plain = _adapted_copy(model, {"0.linear1": "linear", "0.linear2": "linear"}).float()
    with torch.set_grad_enabled(grad):  # no grad in eval: the fused fast path
        ours, ref = model(x), plain(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_a_grandparent_reading_a_weight_sees_the_adapter() -> None:
    model = Grandparent().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    lp.inject_lora(model, target="block.proj", rank=2)
    randomize_adapters(model)
    ref = _adapted_copy(model, {"block.proj": "linear"})(x)
    assert_close(model(x), ref, scale=_scale(ref))


def test_reads_outside_a_forward_get_the_parameter() -> None:
    model = nn.Sequential(Reader(nn.Linear(4, 3)))
    lp.inject_lora(model, target="0.layer", rank=2)
    randomize_adapters(model)
    layer = model[0].layer
    assert isinstance(layer.weight, nn.Parameter)
    assert layer.weight is layer._parameters["weight"]
    x = torch.randn(2, 4)
    with lp.disable_adapters(model):  # nothing live: the owner reads W itself
        assert torch.equal(model(x), F.linear(x, layer._parameters["weight"], layer.bias))


def test_an_owner_read_cannot_differ_per_row() -> None:
    model = nn.Sequential(Reader(nn.Linear(4, 3)))
    lp.inject_lora(model, target="0.layer", rank=2)
    lp.inject_lora(model, target="0.layer", rank=2, name="b")
    randomize_adapters(model)
    with pytest.raises(lp.StateError, match="one weight cannot differ per row"), \
            lp.adapter_per_sample(model, ["default", "b"]):
        model(torch.randn(2, 4))


class Checkpointed(nn.Module):
    """Reads its child's weight in a function run under activation checkpointing."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.pre, self.proj, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 4), reentrant

    def _f(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.nn.functional.linear(h, self.proj.weight, self.proj.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if self.reentrant is None:
            return self._f(h)
        return torch.utils.checkpoint.checkpoint(self._f, h, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [True, False])
def test_reads_in_a_checkpointed_recomputation_see_the_adapter(reentrant: bool) -> None:
    def gradients(mode: bool | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(Checkpointed(mode)).double()
        lp.inject_lora(model, target=["0.proj", "0.pre"], rank=2)
        randomize_adapters(model)
        model(torch.randn(3, 4, dtype=torch.float64)).square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(None), gradients(reentrant)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
