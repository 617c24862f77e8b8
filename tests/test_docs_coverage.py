"""What the README and docs/transformers.md say is covered, and refused, is what happens.

Each row of the README's "What is covered" table and of the transformers page's layer
table is checked here. When a layer type gains support, its row fails until the docs
say so.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, delta
from torch import nn

import loraplug as lp

ROOT = Path(__file__).resolve().parents[1]


def table_rows(path: Path, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading``, header and rule left out."""
    text = path.read_text().split(heading, 1)[1]
    lines = text.split("\n\n|", 1)[-1].splitlines()
    rows = []
    for line in ("|" + lines[0], *lines[1:]):
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]


def verdict(cell: str) -> str:
    found = re.match(r"(wrapped|refused)\b", cell)
    assert found, f"say 'wrapped' or 'refused': {cell!r}"
    return found.group(1)


# --------------------------------------------------------------------------- README
class Dense(nn.Module):
    """A layer type of one's own, outside torch: y = x Wᵀ + b."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@lp.register_lora_layer(Dense)
class LoRADense(lp.LoRALinear):
    """LoRA on :class:`Dense`: the same math as on ``nn.Linear``."""


def gpt2_conv1d() -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return nn.Sequential(pytorch_utils.Conv1D(4, 3))


def quantized() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    torchao_quantization = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"),
                          bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False),
                          nn.Linear(64, 64)).to("cpu")  # bitsandbytes quantizes here
    torchao_quantization.quantize_(model[2], torchao_quantization.Int8WeightOnlyConfig())
    return model


def attention() -> nn.Module:
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    return model


def swin_attention() -> nn.Module:
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    model = nn.Module()
    model.attn = swin.ShiftedWindowAttention(8, [2, 2], [0, 0], num_heads=2)
    return model


# The first code span of each row -> (a model, its targets: each one on its own).
README_CHECKS: dict[str, Callable[[], tuple[nn.Module, list[str]]]] = {
    "nn.Linear": lambda: (nn.Sequential(nn.Linear(3, 4)), ["0"]),
    "nn.Conv1d": lambda: (nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv2d(2, 4, 3, stride=2),
                                        nn.Conv3d(4, 4, 1, groups=2)), ["0", "1", "2"]),
    "nn.Embedding": lambda: (nn.Sequential(nn.Embedding(5, 3)), ["0"]),
    "register_lora_layer": lambda: (nn.Sequential(Dense(3, 4)), ["0"]),
    "Linear4bit": lambda: (quantized(), ["0", "1", "2"]),
    "nn.MultiheadAttention": lambda: (attention(), ["attn.q", "attn.v", "attn.out_proj"]),
    "nn.TransformerEncoderLayer": lambda: (nn.TransformerEncoderLayer(8, 2, 16),
                                           ["linear1", "linear2"]),
    "Conv1D": lambda: (gpt2_conv1d(), ["0"]),
    "qkv": lambda: (swin_attention(), ["attn.qkv", "attn.proj"]),
    "nn.ConvTranspose1d/2d/3d": lambda: (
        nn.Sequential(nn.ConvTranspose1d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3),
                      nn.ConvTranspose3d(2, 2, 3), nn.LSTM(3, 3), nn.GRU(3, 3),
                      nn.Bilinear(2, 2, 2), nn.LayerNorm(3), nn.BatchNorm2d(3),
                      nn.GroupNorm(1, 3)), [str(i) for i in range(9)]),
}
README_ROWS = table_rows(ROOT / "README.md", "## What is covered")


@pytest.mark.parametrize("row", README_ROWS, ids=[r[0][:40] for r in README_ROWS])
def test_readme_coverage_row(row: list[str]) -> None:
    key = re.search(r"`([^`]+)`", row[0] if "`" in row[0] else row[1]).group(1)
    assert key in README_CHECKS, f"no check for the README row {row[0]!r}: add one here"
    for target in README_CHECKS[key]()[1]:
        model = README_CHECKS[key]()[0]
        if verdict(row[1]) == "wrapped":
            assert lp.inject_lora(model, target=target, rank=2) == [target]
        else:
            with pytest.raises(lp.TargetError):
                lp.inject_lora(model, target=target, rank=2)
            assert not any(isinstance(m, lp.LoRALayer) for m in model.modules())


def test_readme_lists_every_check() -> None:
    assert len(README_ROWS) == len(README_CHECKS)


def test_your_own_layer_type_is_exact() -> None:
    """The README's row for your own types: the registered layer computes W + s·B·A."""
    torch.manual_seed(0)
    model = nn.Sequential(Dense(3, 4).double())
    lp.inject_lora(model, target="0", rank=2, alpha=3)
    layer = model[0]
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(5, 3, dtype=torch.float64)
    a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    expected = F.linear(x, layer.weight.detach() + delta("linear", a, b, 3 / 2),
                        layer.bias.detach())
    assert_close(model(x).detach(), expected)
    lp.merge(model)
    with torch.no_grad():  # a merged layer in a training forward warns (it cannot train)
        assert_close(model(x), expected)


# --------------------------------------------------------------------------- transformers
def transformers_models() -> dict[str, Callable[[], nn.Module]]:
    """Each model the transformers page names, small and with random weights."""
    t = pytest.importorskip("transformers")
    decoder = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    encoder = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2}
    return {
        "Llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**decoder)),
        "Mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**decoder)),
        "Qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**decoder)),
        "BERT": lambda: t.BertModel(t.BertConfig(**encoder)),
        "RoBERTa": lambda: t.RobertaModel(t.RobertaConfig(**encoder)),
        "ViT": lambda: t.ViTModel(t.ViTConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4)),
        "Whisper": lambda: t.WhisperModel(t.WhisperConfig(
            vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8,
            max_target_positions=8)),
        "GPT-2": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=64, bos_token_id=0, eos_token_id=0, n_embd=16, n_layer=1, n_head=2,
            n_positions=8)),
    }


TRANSFORMERS_ROWS = table_rows(ROOT / "docs" / "transformers.md", "## Which layers")


@pytest.mark.parametrize("row", TRANSFORMERS_ROWS,
                         ids=[f"{r[0]}:{r[1][:30]}" for r in TRANSFORMERS_ROWS])
def test_transformers_layer_row(row: list[str]) -> None:
    builders = transformers_models()
    names, patterns = row[0].split(", "), re.findall(r"`([^`]+)`", row[1])
    types = re.findall(r"`(?:nn\.)?([^`]+)`", row[2]) or row[2].replace(" ", "").split(",")
    unmatched = set(patterns)
    for name in names:
        model = builders[name]()
        modules = dict(model.named_modules())
        here = [p for p in patterns if fnmatch.filter(modules, p)]
        unmatched -= set(here)
        assert here, f"{name}: none of {patterns} names a module"
        if verdict(row[3]) == "wrapped":
            wrapped = lp.find_targets(model, here)
            assert wrapped
            for path in wrapped:  # each selected layer is of a type the row names
                assert any(type(modules[path]).__name__.endswith(t.rsplit(".", 1)[-1])
                           for t in types), (path, type(modules[path]))
        else:
            with pytest.raises(lp.TargetError) as refused:
                lp.find_targets(model, here)
            selected = {type(modules[n]).__name__ for p in here for n in fnmatch.filter(modules, p)}
            assert any(t in str(refused.value) for t in selected), refused.value
    assert not unmatched, f"{unmatched} name no module in {names}"
