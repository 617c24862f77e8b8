"""Hooks registered on a wrapped module keep running on its LoRA layer, and come back at unload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from strategies import randomize_adapters
from torch import nn

import loraplug as lp

X = torch.randn(3, 4, dtype=torch.float64)


def model_with_hooks(calls: list[str]) -> tuple[nn.Sequential, list]:
    """A Linear whose forward pre-hook doubles the input and whose forward hook adds one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    layer = model[0]

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        calls.append("pre")
        return (2 * args[0],), kwargs

    def post(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls.append("post")
        return output + 1

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True),
               layer.register_forward_hook(post, always_call=True)]
    return model, handles


def test_forward_hooks_keep_running_after_injection() -> None:
    calls: list[str] = []
    model, _ = model_with_hooks(calls)
    plain, _ = model_with_hooks([])
    lp.inject_lora(model, target="0", rank=2)
    assert torch.equal(model(X), plain(X))  # a fresh adapter changes nothing
    assert calls == ["pre", "post"]
    randomize_adapters(model)
    layer = model[0]
    w = layer.weight + layer.scaling["default"] * layer.lora_B["default"] @ layer.lora_A["default"]
    assert_close(model(X), F.linear(2 * X, w, layer.bias) + 1)  # the adapter sees 2x too


def test_handles_keep_working_and_unload_gives_the_hooks_back() -> None:
    calls: list[str] = []
    model, (pre, post) = model_with_hooks(calls)
    original = model[0]
    lp.inject_lora(model, target="0", rank=2)
    pre.remove()  # a handle from before injection removes the hook from the LoRA layer
    model(X)
    assert calls == ["post"]
    added = model[0].register_forward_pre_hook(lambda m, a: calls.append("added"))
    lp.unload(model)
    assert model[0] is original
    calls.clear()
    model(X)
    assert calls == ["added", "post"]  # hooks registered while injected stay with the module
    added.remove()
    post.remove()
    calls.clear()
    model(X)
    assert calls == []


def test_backward_and_state_dict_hooks_move_with_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    grads: list[torch.Size] = []
    model[0].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    model[0].register_state_dict_pre_hook(lambda m, prefix, keep: grads.append(prefix))

    def rename(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
        if prefix + "old_weight" in state:  # a checkpoint of an older version of the module
            state[prefix + "weight"] = state.pop(prefix + "old_weight")

    model[0].register_load_state_dict_pre_hook(rename)
    lp.inject_lora(model, target="0", rank=2)
    model(X.clone().requires_grad_()).sum().backward()
    assert grads == [torch.Size([3, 3])]
    model.state_dict()
    assert grads[-1] == "0."
    old = {"0.old_weight": torch.ones(3, 4, dtype=torch.float64)}
    model.load_state_dict(old, strict=False)
    assert torch.equal(model[0].weight, torch.ones(3, 4, dtype=torch.float64))


def test_hook_order_and_always_call_are_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    calls: list[str] = []
    failing = [False]
    model[0].register_forward_pre_hook(lambda m, a: calls.append("first"))
    model[0].register_forward_pre_hook(lambda m, a: calls.append("prepended"), prepend=True)

    def fail(module: nn.Module, args: tuple) -> None:
        if failing[0]:
            raise RuntimeError("from the hook")

    model[0].register_forward_pre_hook(fail)
    model[0].register_forward_hook(lambda m, a, o: calls.append("always"), always_call=True)
    lp.inject_lora(model, target="0", rank=2)
    model(X)
    assert calls == ["prepended", "first", "always"]
    calls.clear()
    failing[0] = True
    with pytest.raises(RuntimeError, match="from the hook"):
        model(X)
    assert calls == ["prepended", "first", "always"]  # ran although the forward raised
