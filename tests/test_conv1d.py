"""transformers' Conv1D (GPT-2): the dense reference, PEFT's files both ways, GPT-2 end to end."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from reference import assert_close, delta, dense_forward
from strategies import Case, conv1d_cases, randomize_adapters
from torch import nn

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

RELATIVE = 1e-5


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item())


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_importing_loraplug_does_not_import_transformers() -> None:
    code = "import sys, loraplug; print('transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "False"
    assert "transformers.pytorch_utils.Conv1D" in lp._registry.supported_types() or \
        lp.lora_layer_type(Conv1D).__name__ == "LoRAConv1D"


@given(conv1d_cases(torch.float64))
def test_conv1d_matches_the_dense_reference_merged_and_unmerged(case: Case) -> None:
    base = copy.deepcopy(case.base)
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha)
    layer = case.model[0]
    assert type(layer).__name__ == "LoRAConv1D"
    assert layer.lora_A["default"].shape == (case.rank, base.weight.shape[0])  # (r, in)
    assert layer.lora_B["default"].shape == (base.weight.shape[1], case.rank)  # (out, r)
    randomize_adapters(case.model)
    d = delta("conv1d", layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"])
    ref = dense_forward(base.double(), base.weight.double() + d, case.x.double())
    assert_close(case.model(case.x), ref, scale=_scale(ref))
    lp.merge(case.model)
    assert_close(layer.weight, (base.weight.double() + d), scale=_scale(ref))
    with torch.no_grad():  # merged inference
        assert_close(case.model(case.x), ref, scale=_scale(ref))
    lp.unload(case.model)
    assert case.model[0] is case.base


class EmbConv1D(nn.Module):
    """PEFT's own test model for Conv1D: an embedding, a Conv1D, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1d(self.emb(x)))
        return self.sm(self.lin0(self.flat(x)))


def _emb_conv1d() -> nn.Module:
    torch.manual_seed(0)
    model = EmbConv1D().eval()
    with torch.no_grad():  # past the ReLU, so that the adapter shows in the output
        model.conv1d.bias.fill_(1.0)
    return model


IDS = torch.arange(90).view(9, 10)
PEFT_CASES = {  # PEFT's tests/test_custom_models.py, "Embedding + transformers Conv1D"
    "conv1d": {"target_modules": ["conv1d"]},
    "emb-conv1d": {"target_modules": ["emb", "conv1d"]},
    "conv1d-fan_in_fan_out": {"target_modules": ["conv1d"], "fan_in_fan_out": True},
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_conv1d_adapter_loads_in_loraplug_and_back(tmp_path: Path, case: str) -> None:
    base = _emb_conv1d()
    torch.manual_seed(2)
    # PEFT's config as its test has it (r = 8 by default), with B random too
    config = peft.LoraConfig(init_lora_weights=False, **PEFT_CASES[case])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    with pytest.warns(lp.LoRAWarning, match="rank exceeds the rank ΔW can have on conv1d"):
        lp.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        y_ours, y_theirs, y_base = ours(IDS), theirs(IDS), base(IDS)
    assert relative_error(y_ours, y_theirs) <= RELATIVE
    assert relative_error(y_base, y_theirs) > 1e-4

    lp.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert relative_error(again(IDS), y_theirs) <= RELATIVE


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                     n_positions=16, attn_pdrop=0.0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_trains_saves_loads_into_peft_and_back_and_merges(tmp_path: Path) -> None:
    base = _gpt2()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    names = lp.inject_lora(model, target=Conv1D, rank=4, alpha=8)
    assert len(names) == 8 and all(type(model.get_submodule(n)).__name__ == "LoRAConv1D"
                                   for n in names)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    assert relative_error(adapted, base(ids).logits) > 1e-4

    lp.save_adapter(model, tmp_path / "ours")
    config = (tmp_path / "ours" / "adapter_config.json").read_text()
    assert '"fan_in_fan_out": true' in config
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, adapted) <= RELATIVE
    theirs.save_pretrained(tmp_path / "peft")
    back = copy.deepcopy(base)
    assert lp.load_adapter(back, tmp_path / "peft") == sorted(names)
    with torch.no_grad():
        assert relative_error(back(ids).logits, adapted) <= RELATIVE

    lp.merge(model)
    with torch.no_grad():
        assert relative_error(model(ids).logits, adapted) <= RELATIVE
    lp.unload(model)
    for key, value in base.state_dict().items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key


def test_gpt2_unload_restores_every_weight_bit_for_bit() -> None:
    base = _gpt2()
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=Conv1D, rank=4)
    randomize_adapters(model)
    lp.unload(model)
    assert all(type(m) is not lp.LoRALinear for m in model.modules())
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_gpt2_tied_lm_head_is_refused_for_merging_with_the_reason() -> None:
    model = _gpt2()
    lp.inject_lora(model, target=[Conv1D, "lm_head"], rank=4)
    randomize_adapters(model)
    with pytest.raises(lp.StateError, match=r"'lm_head' with \['transformer.wte'\] is shared"):
        lp.merge(model)
    lp.merge(model.transformer)  # the blocks alone merge
    assert all(layer.merged for layer in model.transformer.modules()
               if isinstance(layer, lp.LoRALayer))


@pytest.mark.parametrize("flag", [True, False])
def test_fan_in_fan_out_is_read_as_peft_reads_it(tmp_path: Path, flag: bool) -> None:
    """PEFT sets the flag per layer from the layer's type; the file's value changes nothing."""
    import json

    model = nn.Sequential(nn.Linear(4, 4), Conv1D(3, 4))
    lp.inject_lora(model, target=["0", "1"], rank=2)
    randomize_adapters(model)
    lp.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # a Conv1D is adapted
    config["fan_in_fan_out"] = flag
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = nn.Sequential(nn.Linear(4, 4), Conv1D(3, 4))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    lp.load_adapter(fresh, tmp_path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fresh(x), model(x))
