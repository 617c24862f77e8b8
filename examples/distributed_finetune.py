"""Fine-tune a LoRA adapter on several processes with DDP or FSDP2, then save it.

A frozen residual MLP learns, through rank-8 adapters, the hidden low-rank change that
turns it into a "teacher" network: synthetic data, so the loss can go to zero.

Run on one machine with two processes (CPU with gloo, or one GPU each with nccl):

    torchrun --nproc-per-node 2 examples/distributed_finetune.py --strategy ddp
    torchrun --nproc-per-node 2 examples/distributed_finetune.py --strategy fsdp2

Without torchrun it trains on one process, on the same global batches. Several machines:
see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import copy
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import loraplug as lp

DIM, DEPTH, SEQ = 32, 2, 8


class Block(nn.Module):
    """x + down(gelu(up(norm(x)))): the residual MLP block of a transformer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, dim)
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, dim: int = DIM, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_base(seed: int) -> Net:
    """The frozen base network; the same seed gives the same weights on every process."""
    torch.manual_seed(seed)
    return Net()


def build_teacher(seed: int) -> Net:
    """The base plus a random rank-4 change of every block weight: what the adapter learns."""
    teacher = copy.deepcopy(build_base(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in teacher.blocks:
            for layer in (block.up, block.down):
                out, inp = layer.weight.shape
                u, v = torch.randn(out, 4, generator=gen), torch.randn(4, inp, generator=gen)
                layer.weight.add_(u @ v / (4 * inp) ** 0.5)
    return teacher


def make_batch(step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global batch ``step``: the same on every process, each takes its own rows."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randn(batch_size, SEQ, DIM, generator=gen)


def adapt(model: nn.Module, rank: int) -> None:
    lp.inject_lora(model, target=["blocks.*.up", "blocks.*.down"], rank=rank, alpha=2 * rank)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="distributed_adapter", help="adapter directory")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Train, save the adapter, reload it on one process; returns the held-out loss."""
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by {world} processes")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    model = build_base(args.seed)
    adapt(model, args.rank)  # freezes the base: only lora_A / lora_B train
    model.to(device)
    teacher = build_teacher(args.seed).to(device).requires_grad_(False)
    if distributed and args.strategy == "ddp":
        # Frozen parameters are left out of DDP's buckets: only adapter gradients are
        # all-reduced, and every adapter is used, so find_unused_parameters stays off.
        train_model: nn.Module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    elif distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:  # one unit per block: frozen W and trainable A, B together
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train_model = model
    else:
        train_model = model

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    local = args.batch_size // world
    label = f"{args.strategy}, {world} processes" if distributed else "1 process"
    bar = tqdm(range(args.steps), disable=rank != 0, desc=label)
    for step in bar:
        x = make_batch(step, args.batch_size, args.seed)[rank * local:(rank + 1) * local]
        x = x.to(device)
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(train_model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            shown = loss.detach().clone()
            if distributed:
                dist.all_reduce(shown)
            bar.set_postfix(loss=f"{shown.item() / world:.4f}")

    # FSDP2: every process calls save_adapter (the shards are gathered), process 0 writes.
    # DDP: the replicas are equal; process 0 saves the unwrapped model.
    if args.strategy == "fsdp2" or rank == 0:
        lp.save_adapter(model, args.out)
    if distributed:
        dist.barrier()

    held_out = make_batch(-1, 64, args.seed)
    result = float("nan")
    if rank == 0:
        # The saved adapter on one process, no distributed state: what inference uses.
        single = build_base(args.seed)
        lp.load_adapter(single, args.out)
        with torch.no_grad():
            target = build_teacher(args.seed)(held_out)
            result = F.mse_loss(single(held_out), target).item()
            with lp.disable_adapters(single):
                base_loss = F.mse_loss(single(held_out), target).item()
        print(f"saved {args.out}; held-out loss {result:.5f} with the adapter, "
              f"{base_loss:.5f} without it")
    if distributed:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
