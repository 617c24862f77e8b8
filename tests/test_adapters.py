"""Named adapters: switching, disabling, deleting, merging safely, and the summary table."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close
from strategies import randomize_adapters
from torch import nn

import loraplug as lp


def two_adapter_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    lp.inject_lora(model, target=nn.Linear, rank=2)
    lp.inject_lora(model, target=nn.Linear, rank=2, alpha=6, name="b")
    randomize_adapters(model)
    return model


X = torch.randn(5, 6)


def run_with(model: nn.Module, names) -> torch.Tensor:
    lp.set_adapter(model, names)
    return model(X)


def test_switching_adapters_changes_the_function_and_back() -> None:
    model = two_adapter_model()
    a, b = run_with(model, "default"), run_with(model, "b")
    assert not torch.allclose(a, b)
    assert torch.equal(run_with(model, "default"), a)


def test_disable_adapters_runs_the_base_exactly_and_restores() -> None:
    model = two_adapter_model()
    with lp.disable_adapters(model):
        base = model(X)
    lp.unload(model)
    assert torch.equal(model(X), base)


def test_disable_adapters_restores_after_an_exception() -> None:
    model = two_adapter_model()
    adapted = model(X)
    with pytest.raises(RuntimeError, match="boom"), lp.disable_adapters(model):
        raise RuntimeError("boom")
    assert torch.equal(model(X), adapted)


def test_merge_merges_the_active_set_and_refuses_to_switch_while_merged() -> None:
    model = two_adapter_model()
    both = run_with(model, ["default", "b"])
    lp.merge(model)
    assert all(layer.merged_adapters == ("default", "b") for layer in (model[0], model[2]))
    with torch.no_grad():  # a merged layer in a training forward warns (it cannot train)
        assert_close(model(X), both)
    with pytest.raises(lp.StateError, match=r"set_adapter: layers \['0', '2'\] are merged; call "
                                            r"loraplug.unmerge"):
        lp.set_adapter(model, "b")
    merged_weights = [model[0].weight.clone(), model[2].weight.clone()]
    with lp.disable_adapters(model):  # taken out exactly, put back exactly
        assert not model[0].merged
        base = model(X)
    assert torch.equal(model[0].weight, merged_weights[0])
    assert torch.equal(model[2].weight, merged_weights[1])
    assert model[0].merged_adapters == ("default", "b")
    lp.unmerge(model)
    with lp.disable_adapters(model):
        assert torch.equal(model(X), base)
    lp.set_adapter(model, "b")


def test_merge_inside_disable_is_refused() -> None:
    model = two_adapter_model()
    with lp.disable_adapters(model):
        with pytest.raises(lp.StateError, match=r"merge: adapters are disabled"):
            lp.merge(model)
        with pytest.raises(lp.StateError, match=r"adapters are disabled on this layer"):
            model[0].merge()
        with pytest.raises(lp.StateError, match=r"unload\(merge=True\): adapters are disabled"):
            lp.unload(model, merge=True)


def test_unknown_adapter_name_suggests_close_names() -> None:
    model = two_adapter_model()
    with pytest.raises(lp.AdapterError, match=r"unknown adapter name\(s\) \['defualt'\]; the "
                                              r"model has \['b', 'default'\]. Did you mean "
                                              r"\['default'\]"):
        lp.set_adapter(model, "defualt")
    with pytest.raises(lp.AdapterError, match=r"delete_adapter: unknown adapter"):
        lp.delete_adapter(model, "c")


def test_operations_on_a_model_without_lora_layers() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    for call in (lp.merge, lp.unmerge, lambda m: lp.set_adapter(m, "x"),
                 lambda m: lp.delete_adapter(m, "x")):
        with pytest.raises(lp.StateError, match=r"has no LoRA layers; call loraplug.inject_lora"):
            call(model)
    assert lp.adapter_names(model) == [] and lp.active_adapters(model) == []


def test_delete_adapter_removes_tensors_and_keeps_others() -> None:
    model = two_adapter_model()
    b_only = run_with(model, "b")
    lp.set_adapter(model, ["default", "b"])
    lp.delete_adapter(model, "default")
    assert lp.adapter_names(model) == ["b"]
    assert lp.active_adapters(model) == ["b"]
    assert not any(".default" in k for k in model.state_dict())
    assert torch.equal(model(X), b_only)


def test_delete_only_active_adapter_activates_first_remaining() -> None:
    model = two_adapter_model()
    lp.set_adapter(model, "b")
    lp.delete_adapter(model, "b")
    assert lp.active_adapters(model) == ["default"]


def test_delete_merged_adapter_is_refused_an_unmerged_one_is_not() -> None:
    model = two_adapter_model()
    lp.merge(model)
    with pytest.raises(lp.StateError, match=r"delete_adapter: adapter 'default' is merged into "
                                            r"\['0', '2'\] .*unmerge\(model, 'default'\) first"):
        lp.delete_adapter(model, "default")
    assert lp.adapter_names(model) == ["b", "default"]
    model.eval()  # merged inference
    merged = model(X)
    lp.delete_adapter(model, "b")  # not merged: deleted, as in PEFT
    assert lp.adapter_names(model) == ["default"] and torch.equal(model(X), merged)
    with pytest.raises(lp.StateError, match=r"adapter 'default' is merged into this layer"):
        model[0].remove_adapter("default")
    with pytest.raises(lp.StateError, match=r"call unmerge\(\) before changing alpha"):
        model[0].set_scale("default", 2.0)
    with pytest.raises(lp.StateError, match=r"unmerge before switching adapters"):
        model[0].set_active(["b"])


def test_safe_merge_is_all_or_nothing() -> None:
    model = two_adapter_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].lora_B["default"][0, 0] = float("nan")  # the second layer is poisoned
    with pytest.raises(lp.StateError, match=r"merge: '2': merging \['default'\] gives a weight "
                                            r"with NaN or inf values.* No layer was changed"):
        lp.merge(model, safe=True)
    assert not model[0].merged and not model[2].merged
    assert torch.equal(model[0].weight, before["0.weight"])
    with pytest.raises(lp.StateError, match=r"gives a weight with NaN or inf values"):
        model[2].merge(safe=True)
    assert torch.equal(model[2].weight, before["2.weight"])


def test_summary_rows_and_counts() -> None:
    model = two_adapter_model()
    table = lp.summary(model)
    assert [row.name for row in table.layers] == ["0", "2"]
    first = table.layers[0]
    assert first.base_type == "nn.Linear" and first.shape == (6, 6)
    assert first.adapters == (("default", 2, 2.0), ("b", 2, 6.0))
    assert first.lora_parameters == 2 * (6 + 6) * 2
    assert table.lora_parameters == first.lora_parameters + 2 * (6 + 2) * 2
    assert table.trainable == table.lora_parameters
    assert table.total == table.lora_parameters + 6 * 6 + 6 + 2 * 6 + 2
    text = str(table)
    assert "default (2, 2), b (2, 6)" in text and "trainable" in text
    lp.merge(model)
    assert "[merged]" in str(lp.summary(model))


def test_a_name_listed_twice_counts_once() -> None:
    model = two_adapter_model()
    once = run_with(model, ["default"])
    assert torch.equal(run_with(model, ["default", "default"]), once)
    assert lp.active_adapters(model) == ["default"]


def test_set_adapter_rejects_non_names() -> None:
    model = two_adapter_model()
    with pytest.raises(lp.AdapterError, match=r"expected an adapter name or a list of names; "
                                              r"received 5"):
        lp.set_adapter(model, 5)  # type: ignore[arg-type]


def test_disabling_a_merged_layer_is_refused() -> None:
    model = two_adapter_model()
    lp.merge(model)
    with pytest.raises(lp.StateError, match=r"merged into its weight; unmerge before disabling"):
        model[0].set_disabled(True)


def test_inject_after_deleting_every_adapter_activates_the_new_one() -> None:
    model = two_adapter_model()
    lp.delete_adapter(model, "b")
    lp.delete_adapter(model, "default")
    assert lp.active_adapters(model) == []
    lp.inject_lora(model, target="0", rank=2, name="c")
    assert lp.active_adapters(model) == ["c"] and model[0]._live == ("c",)


def test_inject_inside_disable_adapters_stays_disabled() -> None:
    model = two_adapter_model()
    model.append(nn.Linear(2, 2))
    with lp.disable_adapters(model):
        base = model(X)
        lp.inject_lora(model, target="3", rank=2)
        randomize_adapters(model)
        assert torch.equal(model(X), base)
    assert not torch.equal(model(X), base)


def test_tied_weights_refuse_to_merge_and_stay_correct_unmerged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight  # tied, as in language models
    lp.inject_lora(model, target="1", rank=2)
    randomize_adapters(model)
    ids = torch.tensor([1, 2, 3])
    out = model(ids)
    h = torch.nn.functional.embedding(ids, model[0].weight)
    w = model[0].weight + model[1].delta_weight("default")
    assert_close(out, h @ w.t())  # the embedding still sees the plain tied weight
    for call, label in ((lp.merge, "merge"), (lambda m: lp.unload(m, merge=True),
                                              r"unload\(merge=True\)")):
        with pytest.raises(lp.StateError, match=label + r": the weight of '1' with \['0'\] is "
                                                  r"shared \(tied\)"):
            call(model)
        assert torch.equal(model(ids), out)


def test_a_layer_first_adapted_inside_disable_adapters_is_enabled_after_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    lp.inject_lora(model, target="0", rank=2)
    with lp.disable_adapters(model):
        lp.inject_lora(model, target="2", rank=2)  # '2' gets its first adapter here
        assert model[2].adapters_disabled
        with lp.disable_adapters(model):  # nested: '2' stays off until the outer block ends
            pass
        assert model[2].adapters_disabled
    assert not model[0].adapters_disabled and not model[2].adapters_disabled
    randomize_adapters(model)
    plain = model[2].base_layer(torch.relu(model[0](X)))
    assert not torch.equal(model(X), plain)  # '2' computes its adapter
    lp.merge(model)  # and merges it, not "inside disable_adapters"
    assert model[2].merged_adapters == ("default",)
