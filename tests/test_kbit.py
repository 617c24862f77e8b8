"""prepare_for_kbit_training: frozen base, norms in float32, input gradients, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from quantized import LLAMA_TARGETS, BnbConfig, quantize_bnb, tiny_llama
from torch import nn

import loraplug as lp

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (loraplug[bnb])")
pytest.importorskip("transformers", reason="transformers is not installed")

TARGETS = [f"*.{t}" for t in LLAMA_TARGETS]


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(_ids(), labels=_ids()).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("before_injection", [True, False])
def test_freezes_the_base_and_casts_half_weights_but_the_quantized(before_injection) -> None:
    model = quantize_bnb(tiny_llama().to(torch.bfloat16), BnbConfig(4, "nf4", True,
                                                                     torch.bfloat16),
                         skip=("lm_head",))
    if not before_injection:
        lp.inject_lora(model, target=TARGETS, rank=4, freeze_base=False)
    assert lp.prepare_for_kbit_training(model, gradient_checkpointing=False) is model
    if before_injection:
        lp.inject_lora(model, target=TARGETS, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight).__name__ == "Params4bit" and q_proj.weight.dtype == torch.uint8
    logits = model(_ids()).logits  # trains: the loss reaches the adapters
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_step(reentrant: bool) -> None:
    model = quantize_bnb(tiny_llama(), BnbConfig(4, "nf4", True), skip=("lm_head",))
    lp.inject_lora(model, target=TARGETS, rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    plain = copy.deepcopy(model)
    lp.prepare_for_kbit_training(model, use_reentrant=reentrant)
    lp.prepare_for_kbit_training(plain, gradient_checkpointing=False)
    assert model.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    expected, got = _lora_grads(plain), _lora_grads(model)
    assert set(got) == set(expected) and len(got) == 2 * 2 * len(LLAMA_TARGETS)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)


def test_the_input_gradient_hook_is_added_once_and_only_where_there_is_an_embedding() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    lp.inject_lora(model, target="2", rank=2)
    lp.prepare_for_kbit_training(model, gradient_checkpointing=False)
    assert not model[0]._forward_hooks  # non-reentrant checkpointing needs none
    lp.prepare_for_kbit_training(model, gradient_checkpointing=False, use_reentrant=True)
    lp.prepare_for_kbit_training(model, gradient_checkpointing=False, use_reentrant=True)
    assert len(model[0]._forward_hooks) == 1
    assert model[0](torch.tensor([1, 2])).requires_grad
    with torch.no_grad():
        assert not model[0](torch.tensor([1, 2])).requires_grad
    no_embedding = nn.Sequential(nn.Linear(4, 4))
    lp.prepare_for_kbit_training(no_embedding, gradient_checkpointing=False, use_reentrant=True)
    assert not no_embedding[0].weight.requires_grad


def test_checkpointing_needs_a_model_that_can_switch_it_on_and_flags_must_be_bools() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8).to(torch.bfloat16))  # no switch
    with pytest.raises(lp.ConfigError, match=r"Sequential has no activation_checkpointing_enable"
                                             r".*gradient_checkpointing=False"):
        lp.prepare_for_kbit_training(model)
    assert model[0].weight.requires_grad and model[1].weight.dtype == torch.bfloat16
    assert not model[0]._forward_hooks  # nothing was changed
    for flag in ("gradient_checkpointing", "use_reentrant"):
        with pytest.raises(lp.ConfigError, match=f"{flag} must be True or False"):
            lp.prepare_for_kbit_training(model, **{flag: 1})
