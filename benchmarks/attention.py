"""Attention and GPT-2 scenarios: torchvision's ViT-B/16 and a transformers GPT-2 (Conv1D).

PEFT adapts an ``nn.MultiheadAttention`` only as a whole (in_proj and out_proj, one A
shared by q, k and v). loraplug's adapters on q and v alone (rank r each) are the same
function as PEFT's whole-attention adapter of rank 2r with

    A = [A_q; A_v] (2r, E),   B = [[B_q, 0], [0, 0], [0, B_v]] (3E, 2r),   out_proj B = 0,

and alpha doubled (so alpha / rank is the same): the PEFT side of ``vit-qv`` holds that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def vit(quick: bool) -> nn.Module:
    """torchvision's ViT-B/16 with random weights (a 2-layer, d64 ViT when ``quick``)."""
    from torchvision.models import VisionTransformer, vit_b_16

    if quick:
        model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                  hidden_dim=64, mlp_dim=128)
    else:
        model = vit_b_16(weights=None)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    return model


def attention_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def qv_names(model: nn.Module) -> list[str]:
    """loraplug's names of q and v of every attention: ``<attention>.q``, ``<attention>.v``."""
    return [f"{n}.{p}" for n in attention_names(model) for p in ("q", "v")]


class LastHidden(nn.Module):
    """A transformers model called with ids, returning the last hidden state (a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, use_cache=False).last_hidden_state


def gpt2(quick: bool) -> nn.Module:
    """transformers' GPT-2 from a config with random weights (6×d768, or 2×d128 quick)."""
    import transformers

    size = dict(n_layer=2, n_embd=128, n_head=4) if quick else dict(n_layer=6, n_embd=768,
                                                                     n_head=12)
    config = transformers.GPT2Config(vocab_size=8192, n_positions=256, bos_token_id=0,
                                     eos_token_id=0, **size)
    return LastHidden(transformers.GPT2Model(config))


def conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def peft_qv_as_whole_attention(base: nn.Module, rank: int,
                               alpha: float) -> tuple[list[str], int, float, Callable]:
    """PEFT's whole-attention adapter holding loraplug's q, v adapters exactly (see above)."""

    paths = attention_names(base)

    def copy(source: nn.Module, peft_model: Any, adapters: tuple[str, ...]) -> None:
        inner = peft_model.get_base_model()
        with torch.no_grad():
            for path in paths:
                ours, theirs = source.get_submodule(path), inner.get_submodule(path)
                e = ours.embed_dim
                for name in adapters:
                    q, v = ours.q, ours.v
                    theirs.lora_A[name].weight.copy_(torch.cat([q.lora_A[name], v.lora_A[name]]))
                    b = theirs.lora_B[name].weight
                    b.zero_()
                    b[:e, :rank] = q.lora_B[name]
                    b[2 * e:, rank:] = v.lora_B[name]
                    theirs.base_layer.out_proj.lora_B[name].weight.zero_()

    return paths, 2 * rank, 2 * alpha, copy
