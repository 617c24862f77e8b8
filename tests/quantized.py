"""Quantized models for the tests: real bitsandbytes and torchao layers built from float ones.

Nothing is downloaded: float layers with random weights are converted the way
transformers' ``BitsAndBytesConfig`` loading converts them (same class, same weights,
quantized when moved to the CPU).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BnbConfig:
    """How bitsandbytes stores a layer: 4-bit (nf4/fp4, double quantization) or 8-bit."""

    bits: int = 4
    quant_type: str = "nf4"
    double: bool = True
    compute_dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        if self.bits == 8:
            return "int8"
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return f"{self.quant_type}{'-dq' if self.double else ''}-{dtype}"


#: Every bitsandbytes configuration the layers are tested with.
BNB_CONFIGS = [
    BnbConfig(4, qt, dq, cd)
    for qt in ("nf4", "fp4") for dq in (False, True) for cd in (torch.float32, torch.bfloat16)
] + [BnbConfig(8)]


def bnb_layer(linear: nn.Linear, config: BnbConfig) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights, quantized on the CPU."""
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if config.bits == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                    has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                  compute_dtype=config.compute_dtype,
                                  compress_statistics=config.double, quant_type=config.quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes when the layer is moved to a device


def quantize_bnb(model: nn.Module, config: BnbConfig, skip: tuple[str, ...] = ()) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` (but those named in ``skip``) quantized."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, bnb_layer(module, config).train(module.training))
    if config.bits == 4:
        model.is_loaded_in_4bit = True  # what transformers sets; PEFT reads it
    else:
        model.is_loaded_in_8bit = True
    return model


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 128) -> nn.Module:
    """A transformers Llama from a config, random weights (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_bnb_model() -> nn.Module:
    """A builder for the command line: two nf4 layers and a float one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    return quantize_bnb(model, BnbConfig(4, "nf4", True), skip=("3",))
