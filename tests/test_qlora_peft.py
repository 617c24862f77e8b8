"""QLoRA against the real ``peft`` package on the same bitsandbytes-quantized Llama.

The same quantized base and the same adapter values in both libraries give the same
outputs (relative 1e-5), and adapter files go both ways: what PEFT saves from a
quantized model loads into loraplug and back. An adapter file does not depend on the
quantization: the same file loads into the float model.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from quantized import BNB_CONFIGS, LLAMA_TARGETS, BnbConfig, quantize_bnb, tiny_llama

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (loraplug[bnb])")
peft = pytest.importorskip("peft", reason="peft is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

#: The bar of the acceptance criteria: relative to the largest output.
RELATIVE = 1e-5
#: nf4 with float32 and bfloat16 compute, fp4 with double quantization, int8.
CONFIGS = [BNB_CONFIGS[0], BNB_CONFIGS[1], BNB_CONFIGS[6], BNB_CONFIGS[-1]]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _peft_config(rank: int = 8, alpha: float = 16):  # type: ignore[no-untyped-def]
    return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=LLAMA_TARGETS,
                           lora_dropout=0.0)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_unmerged_outputs_equal_peft_on_the_same_quantized_model(llama, config: BnbConfig,
                                                                 mode: str) -> None:
    base = quantize_bnb(llama, config, skip=("lm_head",))
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config())
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ \
        == "peft.tuners.lora.bnb"  # PEFT's own bitsandbytes layer
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target=[f"*.{t}" for t in LLAMA_TARGETS], rank=8, alpha=16)
    _randomize(ours, 0)
    inner = theirs.get_base_model()
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lp.LoRALayer):
                inner.get_submodule(name).lora_A["default"].weight.copy_(layer.lora_A["default"])
                inner.get_submodule(name).lora_B["default"].weight.copy_(layer.lora_B["default"])
    getattr(ours, mode)()
    getattr(theirs, mode)()
    expected = _logits(theirs)
    assert relative_error(_logits(base), expected) > 1e-3  # the adapters matter
    assert relative_error(_logits(ours), expected) < RELATIVE


@pytest.mark.parametrize("config", [BNB_CONFIGS[0], BNB_CONFIGS[-1]], ids=str)
def test_qlora_files_go_both_ways(llama, config: BnbConfig, tmp_path) -> None:
    base = quantize_bnb(llama, config, skip=("lm_head",))
    # PEFT -> loraplug
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(rank=4, alpha=8))
    _randomize(theirs, 1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    loaded = lp.load_adapter(ours, tmp_path / "peft")
    assert len(loaded) == 2 * len(LLAMA_TARGETS)
    assert relative_error(_logits(ours), _logits(theirs)) < RELATIVE
    # loraplug -> PEFT
    _randomize(ours, 2)
    lp.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert relative_error(_logits(back), _logits(ours)) < RELATIVE
    # The file is the adapter alone: PEFT's QLoRA file loads into the float model, and
    # what the float model saves loads into the quantized one, tensor for tensor.
    dense = copy.deepcopy(llama)
    lp.load_adapter(dense, tmp_path / "peft")
    lp.save_adapter(dense, tmp_path / "dense")
    again = copy.deepcopy(base)
    lp.load_adapter(again, tmp_path / "dense")
    expected = theirs.state_dict()
    for key, value in lp.adapter_state_dict(again).items():
        module, ab, _ = key.rsplit(".", 2)
        assert torch.equal(value, expected[f"base_model.model.{module}.{ab}.default.weight"])


@pytest.mark.slow
def test_an_adapter_peft_trained_on_a_transformers_4bit_model_loads_with_its_outputs(
        llama, tmp_path) -> None:
    # The way QLoRA users get their model: from_pretrained with a BitsAndBytesConfig.
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    llama.save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)

    def load() -> torch.nn.Module:
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu",
                                                quantization_config=quantization).eval()
    theirs = peft.get_peft_model(peft.prepare_model_for_kbit_training(
        load(), use_gradient_checkpointing=False), _peft_config(rank=4, alpha=8))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for _ in range(3):
        loss = theirs(_ids(), labels=_ids()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load()
    lp.load_adapter(ours, tmp_path / "peft")
    assert relative_error(_logits(ours), _logits(theirs)) < RELATIVE
    assert relative_error(_logits(load()), _logits(theirs)) > 1e-3
