"""nn.MultiheadAttention adapters in files: PEFT's MHA cases both ways, q/k/v parts in ours."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from reference import attention_dense
from safetensors.torch import load_file
from strategies import randomize_adapters
from test_attention import deltas
from torch import nn

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
peft = pytest.importorskip("peft")

RELATIVE = 1e-5


class ModelMha(nn.Module):
    """PEFT's own test model for attention (tests/test_custom_models.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.mha(x, x, x)
        return self.sm(self.lin0(x))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return ModelMha().eval()


X = torch.rand(9, 10, generator=torch.Generator().manual_seed(1))  # unbatched, as in PEFT's test


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _peft(base: nn.Module, path: Path, **config: object) -> nn.Module:
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        init_lora_weights=False, **config)).eval()  # B random too: the adapter matters
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]])  # PEFT's "MHA 1/2 LoRA"
def test_peft_attention_adapter_loads_in_loraplug_and_back(tmp_path: Path, targets) -> None:
    base = _base()
    theirs = _peft(base, tmp_path / "peft", target_modules=targets)
    ours = copy.deepcopy(base)
    if "lin0" in targets:  # PEFT's r = 8 on a Linear(10, 2)
        with pytest.warns(lp.LoRAWarning, match="rank exceeds the rank ΔW can have on lin0"):
            names = lp.load_adapter(ours, tmp_path / "peft")
    else:
        names = lp.load_adapter(ours, tmp_path / "peft")
    assert names == sorted([*targets, "mha.out_proj"])
    with torch.no_grad():
        y_ours, y_theirs = ours(X), theirs(X)
        assert relative_error(y_ours, y_theirs) <= RELATIVE
        assert relative_error(base(X), y_theirs) > 1e-3

    lp.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(targets)  # out_proj comes with the attention
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert relative_error(again(X), y_theirs) <= RELATIVE


def test_peft_adds_the_out_proj_adapter_twice() -> None:
    """The fact behind LoRAMultiheadAttention.peft_part_factors, pinned on PEFT itself."""
    base = _base()
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=["mha"], init_lora_weights=False)).eval()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target="mha", rank=8, alpha=8)
    inner = theirs.base_model.model.mha
    with torch.no_grad():
        ours.mha.lora_A["default"].copy_(inner.lora_A["default"].weight)
        ours.mha.lora_B["default"].copy_(inner.lora_B["default"].weight)
        out = inner.base_layer.out_proj
        ours.mha.out_proj.lora_A["default"].copy_(out.lora_A["default"].weight)
        ours.mha.out_proj.lora_B["default"].copy_(out.lora_B["default"].weight)
        found = deltas(ours.mha)
        twice = {**found, "out_proj": 2 * found["out_proj"]}
        y = inner(X, X, X)[0]
        assert relative_error(y, attention_dense(base.mha, twice, X, X, X)[0]) < 1e-6
        assert relative_error(y, attention_dense(base.mha, found, X, X, X)[0]) > 1e-3


def test_state_dict_export_goes_into_peft_and_back_exactly() -> None:
    base = _base()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target="mha", rank=4, alpha=8)
    randomize_adapters(ours)
    state = lp.adapter_state_dict(ours)
    assert set(state) == {"mha.lora_A.weight", "mha.lora_B.weight",
                          "mha.base_layer.out_proj.lora_A.weight",
                          "mha.base_layer.out_proj.lora_B.weight"}
    bare = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]), copy.deepcopy(base))
    result = peft.set_peft_model_state_dict(bare, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert relative_error(bare.eval()(X), ours(X)) <= RELATIVE
    fresh = copy.deepcopy(base)
    lp.inject_lora(fresh, target="mha", rank=4, alpha=8)
    assert lp.load_adapter_state_dict(fresh, state) == ["mha", "mha.out_proj"]
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("targets", [["mha.q", "mha.v"], ["mha.k", "mha.out_proj"],
                                     ["mha", "mha.q"]])
def test_parts_save_and_load_exactly(tmp_path: Path, targets) -> None:
    base = _base()
    ours = copy.deepcopy(base)
    names = lp.inject_lora(ours, target=targets, rank=2, alpha=4)
    randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path)
    fresh = copy.deepcopy(base)
    assert lp.load_adapter(fresh, tmp_path) == names
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(X), ours(X))


def test_separate_qkv_weights_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True))
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target="0", rank=2)
    randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path)
    fresh = copy.deepcopy(base)
    assert lp.load_adapter(fresh, tmp_path) == ["0.k", "0.out_proj", "0.q", "0.v"]
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    with torch.no_grad():
        assert torch.equal(fresh[0](q, k, v)[0], ours[0](q, k, v)[0])
