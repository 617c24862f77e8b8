"""Gradient checkpointing around blocks with LoRA layers gives the gradients of the plain run.

``torch.utils.checkpoint`` drops a block's activations in forward and recomputes them in
backward, restoring the RNG state so that dropout draws the same masks again. A LoRA
layer keeps no state across a forward call, so the recomputed block is the same
function: gradients must be identical, with LoRA dropout on too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import loraplug as lp


class Block(nn.Module):
    """x + fc2(conv(dropout(gelu(fc1(x))))): Linear and Conv1d LoRA layers, base dropout."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.drop = nn.Dropout(0.1)
        self.conv = nn.Conv1d(2 * dim, 2 * dim, 3, padding=1, groups=2)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, dim)
        h = self.drop(F.gelu(self.fc1(x)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # convolve over T
        return x + self.fc2(h)


class Net(nn.Module):
    def __init__(self, dim: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, 5)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            if self.reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _model(targets: list[str]) -> Net:
    torch.manual_seed(0)
    model = Net().double()
    lp.inject_lora(model, target=targets, rank=2, alpha=4.0, dropout=0.2)
    lp.inject_lora(model, target=targets, rank=2, dropout=0.3, name="b")
    lp.set_adapter(model, ["default", "b"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B (or A for embeddings) starts at zero: give it values
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model.train()


BLOCK_TARGETS = ["blocks.*.fc1", "blocks.*.conv", "blocks.*.fc2"]
_IDS = torch.tensor([[1, 4, 9, 2, 15, 0, 7], [3, 3, 8, 12, 5, 6, 10]])


def _grads(model: Net, reentrant: bool | None, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.reentrant = reentrant
    torch.manual_seed(seed)
    model(_IDS).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_blocks_give_the_same_gradients_with_dropout(reentrant: bool) -> None:
    model = _model(["emb", *BLOCK_TARGETS, "head"])
    plain = _grads(model, None, seed=3)
    checkpointed = _grads(model, reentrant, seed=3)
    expected = sorted(n for n, p in model.named_parameters() if ".lora_" in n)
    assert sorted(plain) == expected
    assert sorted(checkpointed) == expected
    for name, grad in plain.items():
        assert torch.equal(checkpointed[name], grad), name
    # Dropout is live: another seed draws other masks, and other gradients.
    other = _grads(model, None, seed=4)
    assert not torch.equal(other["blocks.0.fc1.lora_A.default"],
                           plain["blocks.0.fc1.lora_A.default"])


def test_reentrant_checkpoint_needs_an_input_that_requires_grad() -> None:
    # Adapters only inside the blocks: the first block's input (a frozen embedding's
    # output) requires no gradient. Reentrant checkpointing then builds no graph
    # through the blocks (PyTorch warns, and backward finds nothing to differentiate);
    # non-reentrant checkpointing works, and so does reentrant once the input is marked
    # with requires_grad_().
    model = _model(BLOCK_TARGETS)
    plain = _grads(model, None, seed=5)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"), \
            pytest.raises(RuntimeError, match="does not require grad"):
        _grads(model, True, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = _grads(model, False, seed=5)
    for name, grad in plain.items():
        assert torch.equal(fixed[name], grad), name

    model.emb.register_forward_hook(lambda module, args, out: out.requires_grad_())
    marked = _grads(model, True, seed=5)
    for name, grad in plain.items():
        assert torch.equal(marked[name], grad), name
