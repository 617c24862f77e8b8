"""Interoperability with the real ``peft`` package: files go both ways with the same outputs.

loraplug → PEFT: ``save_adapter`` then ``PeftModel.from_pretrained`` (or
``inject_adapter_in_model`` + ``set_peft_model_state_dict``) on the same base.
PEFT → loraplug: ``get_peft_model`` + ``save_pretrained`` then ``load_adapter``.
Outputs must agree in float32 to 1e-6 relative (max |Δ| / max |y|), and the adapters
must matter (outputs differ from the base's).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from strategies import randomize_adapters
from test_files import assert_unchanged, snapshot
from torch import nn

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
peft = pytest.importorskip("peft")

#: The bar of the acceptance criteria: float32, relative to the largest output.
RELATIVE = 1e-6


class Net(nn.Module):
    """An embedding, an ungrouped convolution and linear layers, as PEFT supports them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.conv(img).mean((2, 3))[:, None, :]
        return self.fc2(torch.tanh(self.fc1(h)))


TARGETS = ["conv", "emb", "fc1", "fc2"]


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 12, (3, 5), generator=gen), torch.randn(3, 3, 8, 8, generator=gen)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_same_function(ours: nn.Module, theirs: nn.Module, base: nn.Module, *args) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        y_ours, y_theirs, y_base = ours(*args), theirs(*args), base(*args)
    if hasattr(y_ours, "logits"):
        y_ours, y_theirs, y_base = y_ours.logits, y_theirs.logits, y_base.logits
    assert y_ours.dtype == torch.float32
    assert relative_error(y_ours, y_theirs) <= RELATIVE
    assert relative_error(y_base, y_theirs) > 1e-3  # the adapter is not a no-op


def peft_adapter(base: nn.Module, path: Path, **config: object) -> nn.Module:
    """A PEFT model with random (non-zero) adapters, saved to ``path``."""
    config.setdefault("init_lora_weights", False)  # B random too, so ΔW is not zero
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("rslora", [False, True])
def test_loraplug_adapter_loads_in_peft(tmp_path: Path, rslora: bool) -> None:
    base = net()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target=["emb", "conv", "fc1"], rank=4, alpha=8, use_rslora=rslora)
    lp.inject_lora(ours, target="fc2", rank=2, alpha=3, use_rslora=rslora)  # rank_pattern
    randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert theirs.peft_config["default"].rank_pattern == {"^fc2": 2}
    assert theirs.base_model.model.fc2.r["default"] == 2
    assert_same_function(ours, theirs, base, *inputs())

    # The other PEFT route: inject into the bare model, then set the state dict.
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    bare = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    result = peft.set_peft_model_state_dict(bare, load_file(tmp_path / "adapter_model.safetensors"))
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    assert_same_function(ours, bare.eval(), base, *inputs())


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_loraplug(tmp_path: Path, rslora: bool) -> None:
    base = net()
    theirs = peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=TARGETS,
                          rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 5}, use_rslora=rslora)
    ours = copy.deepcopy(base)
    assert lp.load_adapter(ours, tmp_path) == TARGETS
    assert (ours.fc2.rank["default"], ours.fc1.alpha["default"]) == (2, 5)
    assert_same_function(ours, theirs, base, *inputs())


def test_peft_regex_targets_and_legacy_bin(tmp_path: Path) -> None:
    base = net()
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=r"(fc\d|conv)", exclude_modules=["fc2"],
        init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    ours = copy.deepcopy(base)
    assert lp.load_adapter(ours, tmp_path) == ["conv", "fc1"]
    assert_same_function(ours, theirs, base, *inputs())


def test_loraplug_peft_loraplug_circle(tmp_path: Path) -> None:
    base = net()
    theirs = peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=4, target_modules=TARGETS)
    ours = copy.deepcopy(base)
    lp.load_adapter(ours, tmp_path / "peft", name="style")
    lp.save_adapter(ours, tmp_path / "ours", name="style")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_same_function(again, theirs, base, *inputs())


def test_peft_grouped_conv_runs_as_in_peft_and_refuses_to_merge(tmp_path: Path) -> None:
    # PEFT's A reads every input channel: loaded as it is, computed as a branch.
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    with pytest.warns(UserWarning, match="groups > 1"):
        theirs = peft_adapter(base, tmp_path / "peft", r=2, target_modules=["0"])
    ours = copy.deepcopy(base)
    assert lp.load_adapter(ours, tmp_path / "peft") == ["0"]
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    assert_same_function(ours, theirs, base, x)
    before = snapshot(ours)
    with pytest.raises(lp.StateError, match="whose ΔW is not block diagonal"):
        lp.merge(ours)
    assert_unchanged(ours, before)
    lp.save_adapter(ours, tmp_path / "ours")  # back to PEFT, as PEFT wrote it
    with pytest.warns(UserWarning, match="groups > 1"):
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert_same_function(ours, again.eval(), base, x)


def test_peft_refuses_loraplug_grouped_conv_tensors(tmp_path: Path) -> None:
    # The other direction of the layout difference: PEFT reports a size mismatch.
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target="0", rank=2)
    lp.save_adapter(ours, tmp_path)
    with pytest.warns(UserWarning, match="groups > 1"), \
            pytest.raises(RuntimeError, match=r"size mismatch .*lora_A"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))


def test_peft_reflect_padded_conv_warns(tmp_path: Path) -> None:
    base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    peft_adapter(base, tmp_path, r=2, target_modules=["0"])
    with pytest.warns(lp.LoRAWarning, match=r"PEFT's A ignores both \(peft#3697\)"):
        lp.load_adapter(copy.deepcopy(base), tmp_path)


# --------------------------------------------------------------------------- transformers
def tiny_llama():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()  # random weights, no download


def test_transformers_model_both_ways(tmp_path: Path) -> None:
    base = tiny_llama()
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    # PEFT -> loraplug, with the embedding targeted: PEFT then also saves the base
    # embedding weight, which matches the model and is accepted.
    theirs = peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"v_proj": 2})
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    ours = copy.deepcopy(base)
    assert len(lp.load_adapter(ours, tmp_path / "peft")) == 5
    assert_same_function(ours, theirs, base, tokens)

    # PEFT -> loraplug with layers_to_transform: the file's keys say which layers exist.
    theirs = peft_adapter(base, tmp_path / "layer1", r=2, target_modules=["o_proj"],
                          layers_to_transform=[1], layers_pattern="layers")
    ours = copy.deepcopy(base)
    assert lp.load_adapter(ours, tmp_path / "layer1") == ["model.layers.1.self_attn.o_proj"]
    assert_same_function(ours, theirs, base, tokens)

    # loraplug -> PEFT, on the MLP this time, with a regex-free exact target list.
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target=["*.mlp.up_proj", "*.mlp.down_proj"], rank=4, alpha=16)
    randomize_adapters(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert_same_function(ours, again, base, tokens)
