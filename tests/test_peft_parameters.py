"""PEFT's ``target_parameters`` and grouped-convolution LoRA cases, both ways.

The models reproduce those of PEFT's own tests (tests/test_custom_models.py): an MLP of
layers that compute with their own parameter (``x @ self.weight + self.bias``), a plain
MLP with one Linear targeted through its weight, and grouped convolutions. Expert stacks
(3-D parameters) are added, both storage orders, two parameters on one module (PEFT
nests one wrapper per parameter). Outputs must agree to rtol 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")


class LinearUsingParameter(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = LinearUsingParameter(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.relu(self.lin0(x.float()))))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.relu(self.lin0(x.float()))))


class ExpertPair(nn.Module):
    """Two expert stacks used in one forward, (E, out, in) or (E, in, out) with
    ``is_transposed`` (the flag PEFT reads), as transformers' MoE experts are."""

    def __init__(self, experts: int, dim: int, hidden: int, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        up, down = ((experts, dim, hidden), (experts, hidden, dim)) if transposed else \
            ((experts, hidden, dim), (experts, dim, hidden))
        self.gate_up_proj = nn.Parameter(torch.randn(*up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(*down) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, T, dim)
        up, down = self.gate_up_proj, self.down_proj
        if not self.is_transposed:
            up, down = up.transpose(1, 2), down.transpose(1, 2)
        return torch.bmm(torch.relu(torch.bmm(x, up)), down)


class Moe(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.experts = ExpertPair(3, 4, 6, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.lin0(x.float()).view(3, -1, 4))


def _inputs() -> torch.Tensor:
    return torch.arange(90).view(9, 10)


MODELS = {
    "MlpUsingParameters": (MlpUsingParameters, {"target_parameters": ["lin0.weight"]}),
    "Mlp": (Mlp, {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    "Moe": (lambda: Moe(False), {"target_modules": ["lin0"], "target_parameters": [
        "experts.gate_up_proj", "experts.down_proj"]}),
    "MoeTransposed": (lambda: Moe(True), {"target_parameters": [
        "experts.down_proj", "experts.gate_up_proj"]}),
}


def _base(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    assert (base - theirs).abs().max() > 1e-3  # the adapter is not a no-op


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_target_parameters_file_loads_in_loraplug(name: str, tmp_path: Path) -> None:
    base = _base(name)
    torch.manual_seed(2)
    config = peft.LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, **MODELS[name][1])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    loaded = lp.load_adapter(ours, tmp_path)
    assert set(MODELS[name][1]["target_parameters"]) <= set(loaded)
    x = _inputs()
    with torch.no_grad():
        _assert_same(ours(x), theirs(x), base(x))
        unmerged = ours(x)
        lp.merge(ours)
        torch.testing.assert_close(ours(x), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_loraplug_target_parameters_file_loads_in_peft(name: str, tmp_path: Path) -> None:
    base = _base(name)
    ours = copy.deepcopy(base)
    spec = MODELS[name][1]
    lp.inject_lora(ours, target=spec.get("target_modules"), rank=2, alpha=5,
                   target_parameters=spec["target_parameters"])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for key, p in ours.named_parameters():
            if ".lora_" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    lp.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = _inputs()
    with torch.no_grad():
        _assert_same(ours(x), theirs(x), base(x))
    again = copy.deepcopy(base)
    lp.load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x))


def test_target_parameters_file_problems_are_reported(tmp_path: Path) -> None:
    base = _base("MlpUsingParameters")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_parameters=["lin0.weight"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for value, message in (
        (["lin0.weight", "lin1.weight"], r"lin1.weight: target_parameters selects it, but the "
                                         r"file lacks lin1.lora_A.weight"),
        ("lin0.weight", r"target_parameters is 'lin0.weight'; expected a list"),
    ):
        config_path.write_text(json.dumps({**config, "target_parameters": value}))
        ours = copy.deepcopy(base)
        with pytest.raises(lp.AdapterFileError, match=message):
            lp.load_adapter(ours, tmp_path)
        assert type(ours.lin0) is LinearUsingParameter


# --------------------------------------------------------------------------- grouped convs
class Conv2dGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(h)).flatten(1)), dim=-1)


class Conv2dGroups2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(12800, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # its own input, as in PEFT's test
        h = torch.arange(9 * 16 * 20 * 20).view(9, 16, 20, 20).float()
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(h)).flatten(1)), dim=-1)


@pytest.mark.parametrize("build", [Conv2dGroups, Conv2dGroups2])
def test_peft_grouped_conv_files_load_and_go_back(build: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build().eval()
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="groups > 1"):
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            target_modules=["conv2d"], init_lora_weights=False)).eval()  # r=8, PEFT's default
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    assert lp.load_adapter(ours, tmp_path / "peft") == ["conv2d"]
    x = _inputs()
    with torch.no_grad():
        _assert_same(ours(x), theirs(x), base(x))
    with pytest.raises(lp.StateError, match="whose ΔW is not block diagonal"):
        lp.merge(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    with pytest.warns(UserWarning, match="groups > 1"):
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    with torch.no_grad():
        _assert_same(ours(x), again.eval()(x), base(x))
