"""Real attention models with random weights: every linear and attention layer at rank 4.

For each model: a fresh adapter changes nothing bit for bit, merged equals unmerged, unload
restores the weights bit for bit, and PEFT reads the saved adapter with equal outputs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference import assert_close
from torch import nn
from torch.profiler import ProfilerActivity, profile

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torchvision = pytest.importorskip("torchvision")

RELATIVE = 1e-5


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


class Output(nn.Module):
    """A model whose call returns one tensor (transformers models return records)."""

    def __init__(self, model: nn.Module, field: str | None) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out if self.field is None else getattr(out, self.field)


def vit(big: bool) -> nn.Module:
    from torchvision.models import VisionTransformer, vit_b_16

    if big:
        return vit_b_16(image_size=32, num_classes=10)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return Output(transformers.GPT2Model(config), "last_hidden_state")


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16, pad_token_id=0)
    return Output(transformers.BertModel(config), "last_hidden_state")


def clip_vision() -> nn.Module:
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=16)
    return Output(transformers.CLIPVisionModel(config), "last_hidden_state")


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


LINEAR_AND_ATTENTION = [nn.Linear, nn.MultiheadAttention]
#: name -> (builder, input, targets: every linear and attention layer)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], Callable]] = {
    "vit-small": (lambda: vit(False), _images, lambda: LINEAR_AND_ATTENTION),
    "vit_b_16": (lambda: vit(True), _images, lambda: LINEAR_AND_ATTENTION),
    "gpt2": (gpt2, _ids, lambda: [_conv1d()]),
    "bert": (bert, _ids, lambda: [nn.Linear]),
    "clip-vision": (clip_vision, _images, lambda: [nn.Linear]),
    "transformer-encoder": (encoder, lambda: torch.randn(2, 6, 32), lambda: LINEAR_AND_ATTENTION),
}
SLOW = {"vit_b_16"}


def _build(case: str) -> tuple[nn.Module, torch.Tensor, list]:
    build, inputs, targets = MODELS[case]
    torch.manual_seed(0)
    return build().eval(), inputs(), targets()


def _randomize(model: nn.Module) -> None:
    """A and B of the size training gives them (a fresh B is zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _cases() -> list:
    return [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in MODELS]


@pytest.mark.parametrize("case", _cases())
def test_fresh_merge_unload_and_peft(tmp_path: Path, case: str) -> None:
    base, x, targets = _build(case)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(base)  # as it is before injection: trainable, autograd on
    if case == "transformer-encoder":
        # In eval mode with frozen weights its layers take torch's fused kernel, which live
        # adapters switch off (see test_encoder_fast_path...): compare on torch's
        # composite path, in train mode (no dropout).
        model.train()
    before = model(x)
    names = lp.inject_lora(model, target=targets, rank=4)
    assert names
    assert torch.equal(model(x), before)  # a fresh adapter changes nothing
    model.eval()

    _randomize(model)
    with torch.no_grad():
        unmerged = model(x)
        assert relative_error(base(x), unmerged) > 1e-4  # the adapters matter
        lp.save_adapter(model, tmp_path)
        merged = copy.deepcopy(model)
        lp.merge(merged)
        assert relative_error(merged(x), unmerged) <= RELATIVE
    lp.unload(model)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    # PEFT's adapters bypass torch's fused attention paths, which read the weights
    # directly: compare on the composite path.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            assert relative_error(theirs(x), unmerged) <= RELATIVE
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


# --------------------------------------------------------------------------- fast path
def _ops(fn: Callable[[], object]) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


FUSED = "aten::_transformer_encoder_layer_fwd"


def _reference(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The adapted encoder in float64: merged on a copy, torch's composite path."""
    dense = copy.deepcopy(model).double()
    lp.merge(dense)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return dense(x.double(), **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("targets", [LINEAR_AND_ATTENTION, ["*.self_attn.q", "*.self_attn.v"],
                                     ["*.linear1"]])
def test_encoder_fast_path_is_off_while_live_and_back_when_merged(targets) -> None:
    model, x, _ = _build("transformer-encoder")
    with torch.no_grad():
        assert FUSED in _ops(lambda: model(x))
    lp.inject_lora(model, target=targets, rank=4)
    _randomize(model)
    with torch.no_grad():
        assert FUSED not in _ops(lambda: model(x))  # live adapters: torch's layers, one by one
        live = model(x)
        assert_close(live, _reference(model, x), torch.float32)
        with lp.disable_adapters(model):
            assert FUSED in _ops(lambda: model(x))
        lp.merge(model)
        assert FUSED in _ops(lambda: model(x))
        assert relative_error(model(x), live) <= RELATIVE


def test_encoder_with_padding_takes_nested_tensors_correctly() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 6, 32)
    pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0] * 6, [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    lp.inject_lora(model, target=LINEAR_AND_ATTENTION, rank=4)
    _randomize(model)
    with torch.no_grad():
        out = model(x, src_key_padding_mask=pad)  # nested inside: torch's encoder converts
        ref = _reference(model, x, src_key_padding_mask=pad)
    assert_close(out[~pad], ref[~pad], torch.float32)
