"""The same adapter in loraplug and in PEFT: identical base weights, identical A and B."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from copy import deepcopy

import torch
from torch import nn

import loraplug as lp


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def randomize(model: nn.Module, seed: int, names: Sequence[str] | None = None) -> None:
    """Give adapters ``names`` (default: all) non-zero A and B (a fresh B or A is zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            parts = key.split(".")
            if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") \
                    and (names is None or parts[-1] in names):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def loraplug_twin(base: nn.Module, targets: list[str], rank: int, alpha: float,
                  adapters: Sequence[str] = ("default",)) -> nn.Module:
    """A copy of ``base`` with loraplug adapters ``adapters`` on ``targets``, randomised."""
    model = deepcopy(base)
    for i, name in enumerate(adapters):
        lp.inject_lora(model, target=targets, rank=rank, alpha=alpha, name=name)
        randomize(model, seed=i, names=[name])
    lp.set_adapter(model, adapters[0])
    return model


def peft_config(targets: list[str], rank: int, alpha: float):  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)


def peft_twin(base: nn.Module, source: nn.Module, targets: list[str], rank: int, alpha: float,
              copy: Callable[..., None] | None = None,
              adapters: Sequence[str] = ("default",)):  # type: ignore[no-untyped-def]
    """A ``PeftModel`` on a copy of ``base`` holding the adapters of ``source`` exactly.

    ``copy(source, peft_model, adapters)`` fills PEFT's tensors when they are laid out
    differently from loraplug's (default: :func:`copy_adapters`).
    """
    from peft import get_peft_model

    model = get_peft_model(deepcopy(base), peft_config(targets, rank, alpha),
                           adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft_config(targets, rank, alpha))
    (copy or copy_adapters)(source, model, tuple(adapters))
    model.set_adapter(adapters[0])
    return model.train(source.training)


def copy_adapters(source: nn.Module, peft_model: nn.Module, adapters: Sequence[str]) -> None:
    """Copy every loraplug A and B of ``source`` into the matching PEFT tensors."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    copied = 0
    with torch.no_grad():
        for path, module in inner.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            # PEFT keeps the children of a module it wraps under base_layer, and applies
            # some of them otherwise (an attention's out_proj twice): see peft_part_factors.
            ours = path.replace(".base_layer.", ".")
            layer = source.get_submodule(ours)
            owner, _, part = ours.rpartition(".")
            factor = getattr(type(source.get_submodule(owner)), "peft_part_factors", {}) \
                .get(part, 1.0)
            for name in adapters:
                if name in module.lora_A:
                    module.lora_A[name].weight.copy_(layer.lora_A[name])
                    module.lora_B[name].weight.copy_(layer.lora_B[name] / factor)
                else:
                    module.lora_embedding_A[name].copy_(layer.lora_A[name])
                    module.lora_embedding_B[name].copy_(layer.lora_B[name])
                copied += 1
    expected = sum(len(layer.adapter_names) for _, layer in lp_layers(source))
    if copied != expected:
        raise RuntimeError(f"copied {copied} adapters into PEFT, expected {expected}")


def lp_layers(model: nn.Module) -> list[tuple[str, lp.LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lp.LoRALayer)]


def peft_merge(model: nn.Module) -> None:
    model.merge_adapter()


def peft_unmerge(model: nn.Module) -> None:
    model.unmerge_adapter()


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (at least 1)."""
    scale = max(1.0, b.abs().max().item())
    return (a.double() - b.double()).abs().max().item() / scale
