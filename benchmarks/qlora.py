"""QLoRA: LoRA training on a Llama-style model whose linear layers are bitsandbytes nf4.

The model is a transformers ``LlamaForCausalLM`` built from a ``LlamaConfig`` (random
weights, ~98 M parameters; nothing downloaded). Its decoder's linear layers become
bitsandbytes ``Linear4bit`` (nf4, double quantization, float32 compute) as
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` would make them; the
tied embedding/head stays float32. loraplug and PEFT get the identical quantized model
and identical adapters (r16 on q, k, v, o, gate, up, down), each prepared its own way
(``prepare_for_kbit_training`` / ``prepare_model_for_kbit_training``: frozen base,
non-reentrant activation checkpointing), and must compute the same logits before
anything is timed. The same loraplug adapter on the float32 model is the memory
baseline.

Measured per training step (forward + causal-LM loss + backward + AdamW):

- time, loraplug and PEFT interleaved, paired median of the per-round ratio;
- peak memory: the model's resident bytes (parameters, buffers, quantization
  statistics, adapters, AdamW state) plus the peak of tensors allocated during the step
  above them (the profiler's memory records, as for the other scenarios).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import loraplug as lp

from .timing import interleaved, peak_memory
from .twins import copy_adapters, max_difference, peft_available, randomize

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def available() -> str | None:
    """Why the scenario cannot run here, or ``None``."""
    for package in ("bitsandbytes", "transformers"):
        try:
            __import__(package)
        except ImportError:
            return f"{package} is not installed (pip install -e .[bnb] transformers)"
    return None


def llama(quick: bool) -> nn.Module:
    """The float32 Llama: 13 layers, d768, MLP 2048, 12 heads, vocab 8192, tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=512) if quick else \
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=13,
             num_attention_heads=12, num_key_value_heads=12, vocab_size=8192)
    config = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def nf4(model: nn.Module) -> nn.Module:
    """A copy with the decoder's linear layers in bitsandbytes nf4 (quantized on the CPU)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in TARGETS:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features,
                                      bias=module.bias is not None, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
            layer.load_state_dict(module.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer.to("cpu").train(module.training))
    model.is_loaded_in_4bit = True  # as transformers marks it; PEFT reads it
    return model


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the model and optimizer hold (each storage once)."""
    seen: dict[int, int] = {}
    tensors = [*model.state_dict(keep_vars=True).values(),
               *(v for state in optimizer.state.values() for v in state.values())]
    for t in tensors:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _step(model: nn.Module, ids: Tensor) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        opt.step()
    return step, opt


def _twins(quick: bool, use_peft: bool) -> dict[str, nn.Module]:
    """loraplug and PEFT on the same nf4 model, loraplug on the float32 one: same adapters."""
    base = llama(quick)
    quantized = nf4(base)
    targets = [f"*.{t}" for t in TARGETS]
    models = {"loraplug": copy.deepcopy(quantized), "fp32": copy.deepcopy(base)}
    for model in models.values():
        lp.inject_lora(model, target=targets, rank=RANK, alpha=ALPHA)
        randomize(model, seed=0)
        lp.prepare_for_kbit_training(model)
    if use_peft:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        theirs = prepare_model_for_kbit_training(
            copy.deepcopy(quantized), use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
        theirs = get_peft_model(theirs, config)
        copy_adapters(models["loraplug"], theirs, ["default"])
        models["peft"] = theirs.get_base_model()
    return models


def run(*, quick: bool, use_peft: bool, log: Callable[[str], None],
        settle: Callable[[], float | None] = lambda: None) -> dict[str, Any]:
    """Everything measured on the QLoRA scenario, as a JSON-ready dict."""
    use_peft = use_peft and peft_available()
    load_before = os.getloadavg()
    log("qlora: building the Llama, quantizing it to nf4")
    models = _twins(quick, use_peft)
    tokens = 32 if quick else 128
    ids = torch.randint(0, 512 if quick else 8192, (1, tokens),
                        generator=torch.Generator().manual_seed(1))
    result: dict[str, Any] = {
        "name": "qlora", "rank": RANK, "alpha": ALPHA, "tokens": tokens,
        "about": f"Llama {'2×d128' if quick else '13×d768'} in bnb nf4 (double quant, float32 "
                 f"compute), 1×{tokens} tokens, r{RANK} on q,k,v,o,gate,up,down, activation "
                 "checkpointing",
        "parameters": sum(p.numel() for p in models["fp32"].parameters()
                          if not p.requires_grad)}
    with torch.no_grad():  # training mode: bitsandbytes keeps its differentiable layout
        logits = {k: m(ids).logits for k, m in models.items()}
    checks = {"loraplug_vs_fp32": max_difference(logits["loraplug"], logits["fp32"])}
    if "peft" in logits:
        checks["loraplug_vs_peft"] = max_difference(logits["loraplug"], logits["peft"])
        if checks["loraplug_vs_peft"] > 1e-5:
            raise AssertionError(f"qlora: loraplug and PEFT logits differ: {checks}")
    result["checks"] = checks
    steps, optimizers = {}, {}
    for key, model in models.items():
        steps[key], optimizers[key] = _step(model, ids)
        steps[key]()  # AdamW state exists from here on: it counts as resident
    log("qlora: peak memory of a training step")
    busy = result["busy"] = {"memory": settle()}
    result["resident_bytes"] = {k: resident_bytes(models[k], optimizers[k]) for k in models}
    result["step_peak_bytes"] = {k: peak_memory(steps[k]) for k in models}
    result["peak_bytes"] = {k: result["resident_bytes"][k] + result["step_peak_bytes"][k]
                            for k in models}
    peaks = result["peak_bytes"]
    result["memory_ratio"] = {"loraplug_over_fp32": peaks["loraplug"] / peaks["fp32"]}
    if "peft" in peaks:
        result["memory_ratio"]["loraplug_over_peft"] = peaks["loraplug"] / peaks["peft"]
    log("qlora: training step time")
    busy["train"] = settle()
    timed = {k: steps[k] for k in ("loraplug", "peft") if k in steps}
    timing = interleaved(timed, rounds=2 if quick else 11)
    result["train"] = {k: s.as_dict() for k, s in timing.stats.items()}
    if "peft" in timed:
        result["train_ratio"] = {"loraplug_over_peft": timing.ratio("loraplug", "peft")}
    result["load"] = {"before": load_before, "after": os.getloadavg()}
    return result
