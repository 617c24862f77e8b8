"""DoRA's cost: a DoRA training step against the same LoRA step, and against PEFT's DoRA.

Each shape gets three twins of one base model with identical A and B (and, for DoRA,
identical magnitudes): loraplug LoRA, loraplug DoRA and PEFT DoRA. After checking that
both DoRA twins compute the same output, training steps (forward + backward + AdamW)
are timed interleaved, and the peak memory of one step is measured for each.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import loraplug as lp

from .models import GPT, linear_names
from .scenarios import _train_step
from .timing import interleaved, peak_memory
from .twins import max_difference, peft_available, randomize


def _twin(base: nn.Module, targets: list[str], rank: int, alpha: float,
          dora: bool) -> nn.Module:
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=targets, rank=rank, alpha=alpha, dora=dora)
    randomize(model, seed=0)
    if dora:  # magnitudes away from their start, so that they matter
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if ".lora_magnitude_vector." in key:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def _peft_dora(base: nn.Module, source: nn.Module, targets: list[str], rank: int,
               alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), use_dora=True))
    inner = model.get_base_model()
    with torch.no_grad():
        for path, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                layer = source.get_submodule(path)
                module.lora_A["default"].weight.copy_(layer.lora_A["default"])
                module.lora_B["default"].weight.copy_(layer.lora_B["default"])
                module.lora_magnitude_vector["default"].weight.copy_(
                    layer.lora_magnitude_vector["default"])
    return inner


def _shapes(quick: bool) -> list[tuple[str, str, Callable[[], nn.Module], Callable[[], Tensor],
                                        Callable[[nn.Module], list[str]]]]:
    gpt = dict(layers=2, dim=256, heads=4, vocab=1024, context=64) if quick else \
        dict(layers=6, dim=768, heads=12, vocab=8192, context=256)
    batch = (2, 64) if quick else (4, 256)
    vit = dict(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64,
               mlp_dim=128) if quick else dict(image_size=224, patch_size=16, num_layers=12,
                                               num_heads=12, hidden_dim=768, mlp_dim=3072)
    images = (1, 3, 32, 32) if quick else (2, 3, 224, 224)
    return [(
        "gpt-all", f"GPT-style decoder {gpt['layers']}×d{gpt['dim']}, batch "
        f"{batch[0]}×{batch[1]}, r16 on every linear layer",
        lambda: GPT(**gpt),
        lambda: torch.randint(0, gpt["vocab"], batch, generator=torch.Generator().manual_seed(1)),
        linear_names,
    ), (
        "vit_b_16-mlp", f"torchvision ViT-B/16{' (2 small layers)' if quick else ''}, batch "
        f"{images[0]} at {images[2]}², r16 on the encoder blocks' MLP linear layers",
        lambda: _vit(vit),
        lambda: torch.randn(*images, generator=torch.Generator().manual_seed(1)),
        lambda m: [n for n in linear_names(m) if ".mlp." in n],
    )]


def _vit(shape: dict[str, int]) -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(**shape)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    return model


def run(*, quick: bool, use_peft: bool, log: Callable[[str], None],
        settle: Callable[[], float | None] = lambda: None) -> list[dict[str, Any]]:
    """Training step and peak memory of LoRA and DoRA twins, per shape."""
    use_peft = use_peft and peft_available()
    results = []
    for name, about, build, inputs, targets_of in _shapes(quick):
        torch.manual_seed(0)
        base = build().eval()
        x = inputs()
        targets = targets_of(base)
        models: dict[str, nn.Module] = {
            "loraplug_lora": _twin(base, targets, 16, 32, dora=False),
            "loraplug_dora": _twin(base, targets, 16, 32, dora=True),
        }
        if use_peft:
            models["peft_dora"] = _peft_dora(base, models["loraplug_dora"], targets, 16, 32)
        checks: dict[str, float] = {}
        with torch.no_grad():
            ours = models["loraplug_dora"](x)
            checks["dora_vs_base"] = max_difference(ours, base(x))
            if "peft_dora" in models:
                checks["loraplug_vs_peft"] = max_difference(ours, models["peft_dora"](x))
                if checks["loraplug_vs_peft"] > 1e-4:
                    raise AssertionError(f"dora-{name}: outputs differ from PEFT's: {checks}")
        log(f"dora-{name}: training step")
        busy = settle()
        steps = {}
        for key, model in models.items():
            model.train()
            steps[key] = _train_step(model, x)
        timing = interleaved(steps, rounds=2 if quick else 7)
        ratios = {"dora_over_lora": timing.ratio("loraplug_dora", "loraplug_lora")}
        if "peft_dora" in steps:
            ratios["peft_dora_over_loraplug_dora"] = timing.ratio("peft_dora", "loraplug_dora")
        results.append({
            "name": name, "about": about, "checks": checks, "busy": busy,
            "train": {k: s.as_dict() for k, s in timing.stats.items()}, "ratio": ratios,
            "train_peak_bytes": {k: peak_memory(step) for k, step in steps.items()},
        })
    return results
