"""The models the benchmarks run: small, self-contained, randomly initialised (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """A pre-norm GPT block: causal self-attention (q, k, v, o) and a 4× GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.ln1(x)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (p(h).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Token embedding, learned positions, ``layers`` blocks and a final LayerNorm.

    No language-model head: the benchmark is about the adapted blocks.
    """

    def __init__(self, *, layers: int, dim: int, heads: int, vocab: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


def vgg19(*, small_classifier: bool = False) -> nn.Module:
    """torchvision's VGG19 with random weights (no download).

    Images of 32 pixels and more work: the adaptive pool feeds the classifier 7×7.
    ``small_classifier`` pools to 1×1 and narrows the classifier to 512 wide (a smoke
    test's model: the real classifier alone holds 120 M parameters).
    """
    from torchvision.models import vgg19 as build

    model = build(weights=None)
    if small_classifier:
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, 1000))
    return model


def linear_names(model: nn.Module, leaves: tuple[str, ...] | None = None) -> list[str]:
    """Names of the nn.Linear modules in ``model`` (whose last name part is in ``leaves``)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and (leaves is None or n.rsplit(".", 1)[-1] in leaves)]
