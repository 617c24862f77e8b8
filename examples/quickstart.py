"""Quickstart: adapt a small frozen network to a new task with LoRA, then merge it away.

Run: python examples/quickstart.py
"""

import torch
from torch import nn

import loraplug as lp


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    x = torch.randn(512, 32)
    y = (x[:, :4] @ torch.randn(4, 4)).argmax(dim=1)  # a task the random network can't do

    names = lp.inject_lora(model, target=nn.Linear, rank=4, alpha=8)
    print(f"wrapped {names}")
    print(lp.summary(model))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"after 200 steps: loss {loss.item():.3f}, accuracy {accuracy:.1%}")

    with torch.no_grad():
        unmerged = model(x)
        lp.merge(model)
        merged = model(x)
    print(f"merged vs unmerged max |Δ|: {(merged - unmerged).abs().max().item():.2e}")
    plain = lp.unload(model, merge=True)
    print(f"plain model again: {type(plain[0]).__name__}, keys {list(plain.state_dict())[:2]}")


if __name__ == "__main__":
    main()
