"""Modules trained in full beside the adapter (``modules_to_save``) and trainable token rows."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import pytest
import torch
from test_files import assert_unchanged, snapshot
from torch import nn

import loraplug as lp


class LM(nn.Module):
    """An embedding, a hidden layer and an output head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


def test_each_adapter_trains_its_own_copy() -> None:
    model, x = classifier(), torch.randn(5, 4)
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="0", rank=2, modules_to_save=["2"])
    lp.inject_lora(model, target="0", rank=2, name="b", modules_to_save=["2"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A.default", "0.lora_A.b", "0.lora_B.default", "0.lora_B.b",
                         "2.modules_to_save.default.weight", "2.modules_to_save.default.bias",
                         "2.modules_to_save.b.weight", "2.modules_to_save.b.bias"]
    assert torch.equal(model(x), base(x))  # the copies start equal to the original
    train(model, x)
    assert torch.equal(model[2].weight, base[2].weight)  # the original is untouched
    y_default = model(x)
    lp.set_adapter(model, "b")
    assert torch.equal(model(x), base(x))  # b never trained: its copy is the original
    lp.set_adapter(model, "default")
    assert torch.equal(model(x), y_default)
    with lp.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    lp.merge(model)
    assert torch.allclose(model(x), y_default, atol=1e-6)
    lp.unmerge(model)
    merged = lp.unload(copy.deepcopy(model), merge=True)
    assert type(merged[2]) is nn.Linear and torch.allclose(merged(x), y_default, atol=1e-6)
    assert lp.unload(copy.deepcopy(model))[2] is not None
    lp.delete_adapter(model, "b")
    assert list(model[2].modules_to_save) == ["default"]


def test_head_file_round_trip_both_ways_with_peft(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    model, x = classifier(), torch.randn(5, 4)
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="0", rank=2, modules_to_save=["2"])
    train(model, x)
    lp.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs(x), model(x))
    theirs.save_pretrained(str(tmp_path / "peft"))
    again = copy.deepcopy(base)
    lp.load_adapter(again, tmp_path / "peft")
    assert torch.equal(again(x), model(x))


def test_token_rows_train_alone_and_follow_a_tied_head() -> None:
    torch.manual_seed(0)
    model, ids = LM().eval(), torch.tensor([[1, 2, 3, 1, 7]])
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="mid", rank=2, trainable_token_indices={"emb": [1, 3]})
    assert torch.equal(model.emb(ids), base.emb(ids))  # rows start as the embedding's own
    # The tied head computes the trained ids' columns in a product of their own.
    torch.testing.assert_close(model(ids), base(ids))
    train(model, ids)
    assert torch.equal(model.emb.weight, base.emb.weight)  # the weight itself never trains
    rows = model.emb.trainable_tokens_delta["default"].detach()
    expected = base.emb.weight.detach().clone()
    expected[[1, 3]] = rows
    torch.testing.assert_close(model.emb(ids), expected[ids])
    torch.testing.assert_close(model.head(torch.ones(1, 6)), torch.ones(1, 6) @ expected.t())
    y = model(ids)
    lp.merge(model)
    assert torch.equal(model.emb.weight, expected)
    torch.testing.assert_close(model(ids), y)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    lp.unmerge(model)
    assert torch.equal(model.emb.weight, base.emb.weight)
    # After a restart: the saved merged state holds the original rows as well.
    saved.seek(0)
    fresh = copy.deepcopy(model)
    lp.merge(fresh)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    lp.unmerge(fresh)
    assert torch.equal(fresh.emb.weight, base.emb.weight)
    unloaded = lp.unload(copy.deepcopy(model), merge=True)
    assert type(unloaded.emb) is nn.Embedding and unloaded.head.weight is unloaded.emb.weight
    torch.testing.assert_close(unloaded(ids), y)


def test_token_rows_file_round_trip_with_peft(tmp_path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, ids = LM(), torch.tensor([[1, 2, 3, 1, 7]])
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="mid", rank=2, trainable_token_indices={"emb": [1, 3]})
    train(model, ids)
    lp.save_adapter(model, tmp_path / "ours")
    fresh = copy.deepcopy(base)
    lp.load_adapter(fresh, tmp_path / "ours")
    assert torch.equal(fresh(ids), model(ids))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs.base_model.model.emb(ids), model.emb(ids))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"modules_to_save": ["nothing"]}, lp.TargetError,
     r"modules_to_save entry 'nothing' matches no module of the model"),
    ({"modules_to_save": ["0"]}, lp.TargetError,
     r"modules_to_save: '0' is trained in full, but \['0'\] carry LoRA adapters"),
    ({"modules_to_save": "2"}, lp.ConfigError, r"modules_to_save must be a list of module names"),
    ({"trainable_token_indices": {"2": [0]}}, lp.TargetError,
     r"trainable_token_indices: '2' is a Linear; expected an nn.Embedding"),
    ({"trainable_token_indices": [0]}, lp.ConfigError,
     r"trainable_token_indices must map embedding names to token ids"),
])
def test_unusable_extras_are_refused_before_any_change(kwargs: dict, error: type,
                                                       match: str) -> None:
    model = classifier()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lp.inject_lora(model, target="0", rank=2, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize(("ids", "match"), [
    ([12], r"trainable_token_indices\['emb'\] is \[12\]; expected a non-empty list of distinct "
           r"token ids in \[0, 12\)"),
    ([1, 1], r"is \[1, 1\]; expected a non-empty list of distinct"),
    ([], r"is \[\]; expected a non-empty list"),
])
def test_bad_token_ids_are_refused(ids: list, match: str) -> None:
    model = LM()
    with pytest.raises(lp.ConfigError, match=match):
        lp.inject_lora(model, target="mid", rank=2, trainable_token_indices={"emb": ids})


def test_a_tied_head_that_cannot_follow_is_refused() -> None:
    model = LM()
    with pytest.raises(lp.TargetError, match=r"'emb' shares its weight with \['head'\], which "
                                             r"cannot follow the trained rows"):
        lp.inject_lora(model, target=["mid", "head"], rank=2,
                       trainable_token_indices={"emb": [1]})


def test_a_second_copy_or_row_set_for_the_same_adapter_is_refused() -> None:
    model = classifier()
    lp.inject_lora(model, target="0", rank=2, modules_to_save=["2"])
    with pytest.raises(lp.ConfigError, match=r"'2' already has a copy for adapter 'default'"):
        lp.inject_lora(model, target="0", rank=2, modules_to_save=["2"])
    lm = LM()
    lp.inject_lora(lm, target="mid", rank=2, trainable_token_indices={"emb": [1]})
    with pytest.raises(lp.ConfigError, match=r"'emb' already trains rows for adapter 'default'"):
        lp.inject_lora(lm, target="mid", rank=2, trainable_token_indices={"emb": [2]})


def test_activating_two_copies_or_overlapping_rows_is_refused() -> None:
    model = classifier()
    lp.inject_lora(model, target="0", rank=2, modules_to_save=["2"])
    lp.inject_lora(model, target="0", rank=2, name="b", modules_to_save=["2"])
    with pytest.raises(lp.StateError, match=r"adapters \['default', 'b'\] each train their own "
                                            r"copy of this module"):
        lp.set_adapter(model, ["default", "b"])
    lm = LM()
    lp.inject_lora(lm, target="mid", rank=2, trainable_token_indices={"emb": [1, 2]})
    lp.inject_lora(lm, target="mid", rank=2, name="b", trainable_token_indices={"emb": [2]})
    with pytest.raises(lp.StateError, match=r"adapters 'default' and 'b' both train token 2"):
        lp.set_adapter(lm, ["default", "b"])


def test_save_merged_writes_the_plain_model_with_copies_rows_and_biases(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model, ids = LM(), torch.tensor([[1, 2, 3, 1, 7]])
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="mid", rank=2, trainable_token_indices={"emb": [1, 3]},
                   lora_bias=True)
    train(model, ids)
    y = model(ids)
    lp.save_merged(model, tmp_path / "merged.safetensors")
    plain = copy.deepcopy(base)
    state = load_file(tmp_path / "merged.safetensors")
    assert sorted(state) == sorted(plain.state_dict())
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(ids), y)


def test_adapter_state_dict_round_trip_with_every_option() -> None:
    model, x = classifier(), torch.randn(5, 4)
    lp.inject_lora(model, target="0", rank=2, dora=True, modules_to_save=["2"])
    train(model, x)
    fresh = classifier()
    lp.inject_lora(fresh, target="0", rank=2, dora=True, modules_to_save=["2"])
    assert lp.load_adapter_state_dict(fresh, lp.adapter_state_dict(model)) == ["0"]
    assert torch.equal(fresh(x), model(x))
    state = lp.adapter_state_dict(model)
    del state["0.lora_magnitude_vector"], state["2.weight"]
    with pytest.raises(lp.AdapterFileError, match=r"0: use_dora is true for this adapter, but "
                                                  r"the file lacks 0.lora_magnitude_vector"):
        lp.load_adapter_state_dict(fresh, state)
    with pytest.raises(lp.AdapterFileError, match=r"2: missing key 2.weight of adapter 'default'"):
        lp.load_adapter_state_dict(fresh, state)


def test_save_merged_of_dora_and_a_trained_head(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, x = classifier(), torch.randn(5, 4)
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="0", rank=2, dora=True, modules_to_save=["2"])
    train(model, x)
    lp.save_merged(model, tmp_path / "merged.safetensors")
    state = load_file(tmp_path / "merged.safetensors")
    assert sorted(state) == sorted(base.state_dict())
    base.load_state_dict(state)
    torch.testing.assert_close(base(x), model(x))
