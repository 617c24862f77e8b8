"""Bad arguments get a loraplug error and change nothing: adapter names torch cannot use as
keys, things that are not models, targets or paths, base layers whose names clash with a
LoRA layer's state, alphas that are not finite and positive."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import loraplug as lp

#: Attributes of nn.ParameterDict / nn.ModuleDict / nn.Module: not usable as keys.
CLASHING = ["keys", "values", "update", "get", "pop", "copy", "training", "forward",
            "__init__", "_parameters"]


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def frozen(model: nn.Module) -> tuple:
    return ([(n, type(m), id(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_frozen(model: nn.Module, before: tuple) -> None:
    after = frozen(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in after[1])


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = net()
    lp.inject_lora(model, target=nn.Linear, rank=2)
    lp.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


# ----------------------------------------------------------------- adapter names
@pytest.mark.parametrize("name", CLASHING)
def test_names_that_clash_with_container_attributes_are_refused_up_front(
        name: str, saved: Path) -> None:
    match = rf"adapter name must be a non-empty string .*received '{name}'"
    model = net()
    with pytest.raises(lp.ConfigError, match=match):
        lp.inject_lora(model, target=nn.Linear, rank=2, name=name)
    lp.inject_lora(model, target=nn.Linear, rank=2)
    before = frozen(model)
    with pytest.raises(lp.ConfigError, match=match):  # on layers that carry adapters already
        lp.inject_lora(model, target=nn.Linear, rank=2, name=name)
    with pytest.raises(lp.AdapterFileError, match=match):
        lp.load_adapter(model, saved, name=name)
    assert_frozen(model, before)
    layer = model[0]
    a, b = layer.new_adapter(2, "kaiming")
    with pytest.raises(lp.ConfigError, match=rf"'{name}' cannot name an adapter"):
        layer.add_adapter(name, a, b, alpha=2.0, dropout=0.0)
    assert list(layer.lora_A.keys()) == list(layer.lora_B.keys()) == ["default"]  # no phantom
    assert_frozen(model, before)


@pytest.mark.parametrize("name", ["keys", "__init__"])
def test_a_clashing_name_stored_in_a_file_is_refused(name: str, saved: Path) -> None:
    weights = saved / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        metadata = {**f.metadata(), "loraplug.adapter": name}
    save_file(tensors, weights, metadata=metadata)
    model = net()
    before = frozen(model)
    with pytest.raises(lp.AdapterFileError, match=rf"received '{name}'"):
        lp.load_adapter(model, saved)
    assert_frozen(model, before)


@pytest.mark.parametrize("name", ["adapter-2", "my adapter", "stil_ü"])
def test_names_torch_can_key_work_everywhere(name: str, tmp_path: Path) -> None:
    model = net()
    lp.inject_lora(model, target=nn.Linear, rank=2)
    lp.inject_lora(model, target=nn.Linear, rank=2, name=name)
    lp.set_adapter(model, name)
    lp.save_adapter(model, tmp_path, name=name)
    fresh = net()
    assert lp.load_adapter(fresh, tmp_path) == ["0", "2"]
    assert lp.adapter_names(fresh) == [name]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    lp.delete_adapter(model, name)
    assert lp.adapter_names(model) == ["default"]


# ----------------------------------------------------------------- models, targets, paths
CALLS: dict[str, Callable[[object, Path], object]] = {
    "inject_lora": lambda m, p: lp.inject_lora(m, target="0", rank=2),  # type: ignore[arg-type]
    "find_targets": lambda m, p: lp.find_targets(m, "0"),  # type: ignore[arg-type]
    "merge": lambda m, p: lp.merge(m),  # type: ignore[arg-type]
    "unmerge": lambda m, p: lp.unmerge(m),  # type: ignore[arg-type]
    "unload": lambda m, p: lp.unload(m),  # type: ignore[arg-type]
    "set_adapter": lambda m, p: lp.set_adapter(m, "default"),  # type: ignore[arg-type]
    "active_adapters": lambda m, p: lp.active_adapters(m),  # type: ignore[arg-type]
    "adapter_names": lambda m, p: lp.adapter_names(m),  # type: ignore[arg-type]
    "delete_adapter": lambda m, p: lp.delete_adapter(m, "default"),  # type: ignore[arg-type]
    "disable_adapters": lambda m, p: lp.disable_adapters(m).__enter__(),  # type: ignore[arg-type]
    "adapter_per_sample": lambda m, p: lp.adapter_per_sample(m, ["default"]).__enter__(),  # type: ignore[arg-type]
    "summary": lambda m, p: lp.summary(m),  # type: ignore[arg-type]
    "save_adapter": lambda m, p: lp.save_adapter(m, p / "out"),  # type: ignore[arg-type]
    "save_merged": lambda m, p: lp.save_merged(m, p / "m.safetensors"),  # type: ignore[arg-type]
    "adapter_state_dict": lambda m, p: lp.adapter_state_dict(m),  # type: ignore[arg-type]
    "load_adapter": lambda m, p: lp.load_adapter(m, p),  # type: ignore[arg-type]
    "load_adapter_state_dict": lambda m, p: lp.load_adapter_state_dict(m, {}),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("model", [3, None, "model.pt", {"0.weight": torch.ones(1)}])
def test_a_model_that_is_not_a_module_is_refused(call: str, model: object, saved: Path) -> None:
    with pytest.raises(lp.ConfigError, match=r"model must be an nn.Module; received "):
        CALLS[call](model, saved)


def test_a_module_object_as_target_is_refused_with_its_name() -> None:
    model = net()
    before = frozen(model)
    with pytest.raises(lp.TargetError, match=r"target received a module object \(nn.Linear\), "
                                             r"not a pattern. It is '2' in the model: pass "
                                             r"target='2'"):
        lp.inject_lora(model, target=model[2], rank=2)
    with pytest.raises(lp.TargetError, match=r"exclude received a module object .* It is not "
                                             r"in the model"):
        lp.find_targets(model, nn.Linear, exclude=[nn.Linear(1, 1)])
    assert_frozen(model, before)


@pytest.mark.parametrize("path", [None, 123, ["adapter"], "", b"adapter"])
def test_a_path_that_is_not_a_path_is_refused(path: object) -> None:
    model = net()
    lp.inject_lora(model, target=nn.Linear, rank=2)
    before = frozen(model)
    for call in (lp.load_adapter, lp.save_adapter, lp.save_merged):
        with pytest.raises(lp.ConfigError, match=rf"{call.__name__}: path must be a non-empty "
                                                 r"str or pathlib.Path; received"):
            call(model, path)  # type: ignore[operator]
    assert_frozen(model, before)


def test_load_adapter_refuses_a_freeze_base_that_is_not_a_bool(saved: Path) -> None:
    model = net()
    before = frozen(model)
    with pytest.raises(lp.ConfigError, match=r"freeze_base must be True or False; received 'no'"):
        lp.load_adapter(model, saved, freeze_base="no")  # type: ignore[arg-type]
    assert_frozen(model, before)


class Learned(nn.Linear):
    """A Linear with tensors named like the state a LoRA layer keeps per adapter."""

    def __init__(self, clash: str, kind: str) -> None:
        super().__init__(4, 4)
        if kind == "parameter":
            self.register_parameter(clash, nn.Parameter(torch.ones(1)))
        else:
            self.register_buffer(clash, torch.ones(1))


@pytest.mark.parametrize("clash", ["alpha", "scaling", "rank", "lora_A"])
@pytest.mark.parametrize("kind", ["parameter", "buffer"])
def test_a_base_layer_with_tensors_named_like_lora_state_is_refused(clash: str,
                                                                    kind: str) -> None:
    model = nn.Sequential(Learned(clash, kind))
    before = frozen(model)
    with pytest.raises(lp.TargetError, match=rf"'0' \(.*Learned\) has parameters, buffers or "
                                             rf"children named \['{clash}'\], names a LoRA layer "
                                             r"uses for its own state"):
        lp.inject_lora(model, target="0", rank=2)
    assert_frozen(model, before)


# ----------------------------------------------------------------- alpha after injection
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 0, 0.0, -1.0,
                                   True, "2"])
def test_set_scale_refuses_what_inject_lora_refuses(alpha: object) -> None:
    model = net()
    lp.inject_lora(model, target="0", rank=2, alpha=4)
    layer = model[0]
    with pytest.raises(lp.ConfigError, match=r"alpha must be a finite number > 0; received"):
        layer.set_scale("default", alpha)  # type: ignore[arg-type]
    with pytest.raises(lp.ConfigError, match=r"alpha must be a finite number > 0; received"):
        lp.inject_lora(model, target="0", rank=2, alpha=alpha, name="b")  # type: ignore[arg-type]
    assert layer.alpha == {"default": 4.0} and layer.scaling == {"default": 2.0}
    layer.set_scale("default", 1)
    assert layer.scaling == {"default": 0.5}
