"""LoRA+ parameter groups: B learns ``ratio`` times faster than A, with any optimizer."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from torch import nn

import loraplug as lp


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def adapted() -> Net:
    torch.manual_seed(0)
    model = Net()
    lp.inject_lora(model, target=["emb", "fc"], rank=2)
    model.head.requires_grad_(True)  # a head trained in full beside the adapter
    return model


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_groups_partition_the_trainable_parameters_with_their_rates() -> None:
    model = adapted()
    groups = by_name(lp.loraplus_param_groups(model, lr=1e-3, ratio=8, embedding_lr=1e-5))
    assert list(groups) == ["lora_A", "lora_B", "embedding", "other"]
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["lora_A"] == {id(model.fc.lora_A["default"])}
    assert ids["lora_B"] == {id(model.fc.lora_B["default"])}
    assert ids["embedding"] == {id(model.emb.lora_A["default"]), id(model.emb.lora_B["default"])}
    assert ids["other"] == {id(model.head.weight), id(model.head.bias)}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*ids.values()) == trainable
    assert sum(len(v) for v in ids.values()) == len(trainable)  # each exactly once
    rates = {name: g["lr"] for name, g in groups.items()}
    assert rates == {"lora_A": 1e-3, "lora_B": 8e-3, "embedding": 1e-5, "other": 1e-3}


def test_an_sgd_step_moves_b_ratio_times_further_than_with_one_rate() -> None:
    x = torch.randint(0, 10, (4, 5))
    plain, plus = adapted(), adapted()
    for model in (plain, plus):
        with torch.no_grad():
            model.fc.lora_B["default"].normal_()  # so that A gets a gradient too
    plus.load_state_dict(plain.state_dict())
    before = copy.deepcopy(plain.state_dict())
    trainable = [p for p in plain.parameters() if p.requires_grad]
    for model, optimizer in (
        (plain, torch.optim.SGD(trainable, lr=0.1)),
        (plus, torch.optim.SGD(lp.loraplus_param_groups(plus, lr=0.1, ratio=4,
                                                        embedding_lr=0.1))),
    ):
        model(x).square().sum().backward()
        optimizer.step()
    for key in before:
        step_plain = plain.state_dict()[key] - before[key]
        step_plus = plus.state_dict()[key] - before[key]
        factor = 4.0 if key == "fc.lora_B.default" else 1.0
        torch.testing.assert_close(step_plus, factor * step_plain)
    assert plus.state_dict()["fc.lora_B.default"].ne(before["fc.lora_B.default"]).any()


def test_weight_decay_spares_vectors() -> None:
    model = adapted()
    groups = by_name(lp.loraplus_param_groups(model, lr=1e-3, weight_decay=0.1))
    assert groups["other"]["weight_decay"] == 0.1
    assert groups["other_no_decay"]["weight_decay"] == 0.0
    assert [p.dim() for p in groups["other_no_decay"]["params"]] == [1]
    torch.optim.AdamW(list(groups.values())).step()  # accepted as is


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": 0}, r"lr must be a finite number > 0; received 0"),
    ({"lr": 1e-3, "ratio": float("nan")}, r"ratio must be a finite number > 0; received nan"),
    ({"lr": 1e-3, "embedding_lr": True}, r"embedding_lr must be a finite number > 0"),
    ({"lr": 1e-3, "weight_decay": -1}, r"weight_decay must be a finite number >= 0; received -1"),
])
def test_invalid_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(lp.ConfigError, match=match):
        lp.loraplus_param_groups(adapted(), **kwargs)


def test_a_model_with_nothing_to_train_is_refused() -> None:
    with pytest.raises(lp.ConfigError, match=r"no parameter of the model requires a gradient"):
        lp.loraplus_param_groups(Net().requires_grad_(False), lr=1e-3)


def test_rates_match_peft_create_loraplus_optimizer() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["emb", "fc", "head"]))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3,
                                          loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5)
    ids = {id(p): n for n, p in theirs.named_parameters()}
    peft_rates = {re.sub(r"^base_model\.model\.|\.weight$", "", ids[id(p)]).replace(
        "lora_embedding_", "lora_"): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, target=["emb", "fc", "head"], rank=2)
    names = {id(p): n for n, p in ours.named_parameters()}
    our_rates = {names[id(p)]: g["lr"]
                 for g in lp.loraplus_param_groups(ours, lr=1e-3, ratio=8, embedding_lr=1e-5)
                 for p in g["params"]}
    assert our_rates == peft_rates
