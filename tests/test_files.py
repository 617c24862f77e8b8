"""Adapter files: round trips for every layer type, exact key sets, state dicts, merged saves.

Expected keys and configs are written out here from PEFT's documented layout, never taken
from the library; merged weights are checked against the dense reference in reference.py.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta
from safetensors import safe_open
from safetensors.torch import load_file
from strategies import Case, any_case, randomize_adapters
from torch import nn

import loraplug as lp

PREFIX = "base_model.model."


# --------------------------------------------------------------------------- helpers
def peft_keys(path: str, kind: str) -> set[str]:
    """PEFT's key names for one adapted layer (REFERENCE.md §2), independent of loraplug."""
    if kind == "embedding":
        return {f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"}
    return {f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"}


def read_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    config = json.loads((path / "adapter_config.json").read_text())
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    return config, tensors, metadata


def snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    """Everything a failed call must leave alone: values, module objects, trainability."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            dict(model.named_modules()),
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model: nn.Module, snap: tuple[dict, dict, dict]) -> None:
    state, modules, grads = snap
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    now_modules = dict(model.named_modules())
    assert list(now_modules) == list(modules)
    assert all(now_modules[n] is modules[n] for n in modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


class Zoo(nn.Module):
    """Every built-in layer type under nested names; ``forward`` returns all outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.blocks = nn.ModuleList([
            nn.ModuleDict({"fc": nn.Linear(6, 8), "out": nn.Linear(8, 6)}) for _ in range(2)])
        self.conv1 = nn.Conv1d(6, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=2, dilation=2, padding_mode="reflect")
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv3 = nn.Conv3d(1, 2, 2)

    def forward(self, ids: torch.Tensor, img: torch.Tensor, vol: torch.Tensor):  # type: ignore[no-untyped-def]
        h = self.emb(ids)
        for block in self.blocks:
            h = h + block["out"](torch.tanh(block["fc"](h)))
        c1 = self.conv1(h.transpose(1, 2))
        c2 = self.grouped(self.conv2(img))
        return h, c1, c2, self.conv3(vol)


ZOO_KINDS = {"emb": "embedding", "blocks.0.fc": "linear", "blocks.0.out": "linear",
             "blocks.1.fc": "linear", "blocks.1.out": "linear", "conv1": "conv",
             "conv2": "conv", "grouped": "conv", "conv3": "conv"}


def zoo(seed: int = 0) -> Zoo:
    torch.manual_seed(seed)
    return Zoo().eval()


def zoo_inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, 11, (2, 5), generator=gen), torch.randn(2, 2, 7, 7, generator=gen),
            torch.randn(1, 1, 3, 3, 3, generator=gen))


def outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(*inputs)


def assert_equal_outputs(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def adapted_zoo(seed: int = 0) -> tuple[Zoo, Zoo]:
    """(a copy of the base, the base with adapter 'default' of mixed ranks and alphas)."""
    base = zoo(seed)
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=["emb", "blocks.*.fc", "conv1", "conv3"], rank=2, alpha=4)
    lp.inject_lora(model, target=["blocks.*.out", "conv2"], rank=3, alpha=1.5)
    lp.inject_lora(model, target="grouped", rank=4, alpha=4)
    randomize_adapters(model, seed)
    return base, model


# --------------------------------------------------------------------------- round trips
@given(case=any_case(), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_is_bit_identical_for_every_layer_type(case: Case, rslora: bool,
                                                           seed: int) -> None:
    base = copy.deepcopy(case.model)
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, use_rslora=rslora)
    randomize_adapters(case.model, seed)
    layer = case.model[0]
    with tempfile.TemporaryDirectory() as tmp:
        lp.save_adapter(case.model, tmp)
        config, tensors, _ = read_dir(Path(tmp))
        assert set(tensors) == peft_keys("0", case.kind)
        a_key, b_key = sorted(tensors)
        assert torch.equal(tensors[a_key], layer.lora_A["default"].detach())
        assert torch.equal(tensors[b_key], layer.lora_B["default"].detach())
        assert {t.dtype for t in tensors.values()} == {layer.weight.dtype}
        assert (config["peft_type"], config["r"], config["use_rslora"]) == \
            ("LORA", case.rank, rslora)
        assert config["lora_alpha"] == case.alpha and config["target_modules"] == ["0"]
        fresh = copy.deepcopy(base)
        assert lp.load_adapter(fresh, tmp) == ["0"]
    expected_scaling = case.alpha / (math.sqrt(case.rank) if rslora else case.rank)
    assert fresh[0].scaling["default"] == expected_scaling
    with torch.no_grad():
        assert torch.equal(fresh(case.x), case.model(case.x))


def test_round_trip_of_mixed_ranks_and_alphas(tmp_path: Path) -> None:
    base, model = adapted_zoo()
    lp.save_adapter(model, tmp_path)
    config, tensors, metadata = read_dir(tmp_path)
    assert set(tensors) == set().union(*(peft_keys(p, k) for p, k in ZOO_KINDS.items()))
    assert (config["r"], config["lora_alpha"]) == (2, 4)  # the most common values
    assert config["rank_pattern"] == {r"^blocks\.0\.out": 3, r"^blocks\.1\.out": 3,
                                      "^conv2": 3, "^grouped": 4}
    assert config["alpha_pattern"] == {r"^blocks\.0\.out": 1.5, r"^blocks\.1\.out": 1.5,
                                       "^conv2": 1.5}
    assert config["target_modules"] == sorted(ZOO_KINDS)
    assert metadata["format"] == "pt" and metadata["loraplug.adapter"] == "default"
    assert metadata["loraplug.version"] == lp.__version__
    fresh = copy.deepcopy(base)
    assert lp.load_adapter(fresh, tmp_path) == sorted(ZOO_KINDS)
    for path in ZOO_KINDS:
        ours, theirs = fresh.get_submodule(path), model.get_submodule(path)
        assert (ours.rank, ours.alpha, ours.scaling) == (theirs.rank, theirs.alpha, theirs.scaling)
    inputs = zoo_inputs()
    assert_equal_outputs(outputs(fresh, inputs), outputs(model, inputs))
    assert not all(torch.equal(x, y) for x, y in zip(outputs(fresh, inputs), outputs(base, inputs)))


def test_two_named_adapters_save_and_load_separately(tmp_path: Path) -> None:
    base = zoo()
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=["blocks.*.fc", "emb"], rank=2, name="style")
    lp.inject_lora(model, target=["blocks.0.*", "conv2"], rank=3, alpha=6, name="topic")
    randomize_adapters(model, 3)
    lp.save_adapter(model, tmp_path / "style", name="style")
    lp.save_adapter(model, tmp_path / "topic", name="topic")
    _, style, _ = read_dir(tmp_path / "style")
    _, topic, _ = read_dir(tmp_path / "topic")
    assert set(style) == peft_keys("blocks.0.fc", "linear") | peft_keys("blocks.1.fc", "linear") \
        | peft_keys("emb", "embedding")
    assert set(topic) == peft_keys("blocks.0.fc", "linear") | peft_keys("blocks.0.out", "linear") \
        | peft_keys("conv2", "conv")

    fresh = copy.deepcopy(base)
    lp.load_adapter(fresh, tmp_path / "style")  # the name comes from the file
    lp.load_adapter(fresh, tmp_path / "topic")
    assert lp.adapter_names(fresh) == ["style", "topic"]
    assert lp.active_adapters(fresh) == ["style"]  # loading a second one does not activate it
    inputs = zoo_inputs()
    for names in (["style"], ["topic"], ["style", "topic"]):
        lp.set_adapter(model, names)
        lp.set_adapter(fresh, names)
        assert_equal_outputs(outputs(fresh, inputs), outputs(model, inputs))

    other = copy.deepcopy(base)
    lp.load_adapter(other, tmp_path / "topic", name="renamed")
    assert lp.adapter_names(other) == ["renamed"]


def test_load_accepts_the_weights_file_and_keys_without_prefix(tmp_path: Path) -> None:
    base, model = adapted_zoo()
    lp.save_adapter(model, tmp_path)
    # PEFT writes bare keys when the adapter was injected without a PeftModel wrapper.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    bare = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(bare, tmp_path / "adapter_model.bin")
    fresh = copy.deepcopy(base)
    # Without loraplug's metadata the file could be PEFT's, whose convolutions differ.
    with pytest.warns(lp.LoRAWarning, match=r"no loraplug metadata .* \['conv2'\]"):
        lp.load_adapter(fresh, tmp_path / "adapter_model.bin")
    inputs = zoo_inputs()
    assert_equal_outputs(outputs(fresh, inputs), outputs(model, inputs))


def test_target_modules_becomes_a_regex_when_the_suffix_rule_would_overmatch(
        tmp_path: Path) -> None:
    # PEFT's list entry "fc" would also select "inner.fc"; an exact regex is written instead.
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(3, 3))
    model.add_module("inner", nn.Sequential())
    model.inner.add_module("fc", nn.Linear(3, 3))
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="fc", rank=1)
    randomize_adapters(model)
    lp.save_adapter(model, tmp_path)
    config, _, _ = read_dir(tmp_path)
    assert config["target_modules"] == "fc"
    lp.load_adapter(base, tmp_path)
    assert [n for n, m in base.named_modules() if isinstance(m, lp.LoRALayer)] == ["fc"]


def test_per_layer_dropout_survives_in_metadata(tmp_path: Path) -> None:
    base = zoo()
    model = copy.deepcopy(base)
    lp.inject_lora(model, target="blocks.0.fc", rank=2, dropout=0.1)
    lp.inject_lora(model, target=["blocks.1.fc", "blocks.1.out"], rank=2, dropout=0.3)
    lp.save_adapter(model, tmp_path)
    config, _, metadata = read_dir(tmp_path)
    assert config["lora_dropout"] == 0.3
    assert json.loads(metadata["loraplug.dropout"]) == {
        "blocks.0.fc": 0.1, "blocks.1.fc": 0.3, "blocks.1.out": 0.3}
    lp.load_adapter(base, tmp_path)
    assert [base.get_submodule(p).dropout["default"] for p in
            ("blocks.0.fc", "blocks.1.fc", "blocks.1.out")] == [0.1, 0.3, 0.3]


def test_load_freezes_the_base_and_leaves_the_rng_alone(tmp_path: Path) -> None:
    base, model = adapted_zoo()
    lp.save_adapter(model, tmp_path)
    frozen, kept = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(123)
    lp.load_adapter(frozen, tmp_path)
    after_load = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_load)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lp.load_adapter(kept, tmp_path, freeze_base=False)
    assert all(p.requires_grad for p in kept.parameters())


def test_loaded_half_precision_adapter_keeps_its_dtype(tmp_path: Path) -> None:
    base = zoo().to(torch.bfloat16)
    model = copy.deepcopy(base)
    lp.inject_lora(model, target="blocks.*", rank=2)
    randomize_adapters(model)
    lp.save_adapter(model, tmp_path)
    _, tensors, _ = read_dir(tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    lp.load_adapter(base, tmp_path)
    ids = zoo_inputs()[0]
    with torch.no_grad():
        ours, theirs = (m.blocks[0]["fc"](m.emb(ids)) for m in (base, model))
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- state dicts
def test_adapter_state_dict_round_trip(tmp_path: Path) -> None:
    base, model = adapted_zoo()
    state = lp.adapter_state_dict(model)
    assert set(state) == {k.removeprefix(PREFIX) for p, kind in ZOO_KINDS.items()
                          for k in peft_keys(p, kind)}
    fresh = copy.deepcopy(base)
    lp.inject_lora(fresh, target=["emb", "blocks.*.fc", "conv1", "conv3"], rank=2, alpha=4)
    lp.inject_lora(fresh, target=["blocks.*.out", "conv2"], rank=3, alpha=1.5)
    lp.inject_lora(fresh, target="grouped", rank=4, alpha=4)
    # A user checkpoint: saved with torch.save, read back without unpickling code.
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert lp.load_adapter_state_dict(fresh, loaded) == sorted(ZOO_KINDS)
    inputs = zoo_inputs()
    assert_equal_outputs(outputs(fresh, inputs), outputs(model, inputs))
    # PEFT's prefixed keys load the same.
    lp.load_adapter_state_dict(fresh, {PREFIX + k: v * 2 for k, v in state.items()})
    assert torch.equal(fresh.conv1.lora_B["default"], 2 * model.conv1.lora_B["default"])


def test_adapter_state_dict_shares_storage_and_names_only_that_adapter() -> None:
    _, model = adapted_zoo()
    lp.inject_lora(model, target="conv1", rank=1, name="other")
    state = lp.adapter_state_dict(model, "other")
    assert list(state) == ["conv1.lora_A.weight", "conv1.lora_B.weight"]
    assert state["conv1.lora_A.weight"].data_ptr() == model.conv1.lora_A["other"].data_ptr()
    with pytest.raises(lp.AdapterError, match=r"unknown adapter name\(s\) \['missing'\]"):
        lp.adapter_state_dict(model, "missing")


# --------------------------------------------------------------------------- save_merged
def test_save_merged_loads_into_the_original_architecture(tmp_path: Path) -> None:
    base, model = adapted_zoo()
    lp.inject_lora(model, target="blocks.0.fc", rank=2, name="inactive")
    randomize_adapters(model, 5)
    before = snapshot(model)
    lp.save_merged(model, tmp_path / "merged.safetensors")
    assert_unchanged(model, before)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, lp.LoRALayer))

    state = load_file(tmp_path / "merged.safetensors")
    plain = zoo(seed=7)
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)  # strict: exactly the base model's keys
    for path, kind in ZOO_KINDS.items():
        layer = model.get_submodule(path)
        want = layer.weight.double() + delta(kind, layer.lora_A["default"].detach(),
                                             layer.lora_B["default"].detach(),
                                             layer.scaling["default"], getattr(layer, "groups", 1))
        assert_close(state[f"{path}.weight"], want, dtype=torch.float32)
    for key, value in base.state_dict().items():  # the rest is the base, bit for bit
        if key.removesuffix(".weight") not in ZOO_KINDS:
            assert torch.equal(state[key], value)
    inputs = zoo_inputs()
    for ours, theirs in zip(outputs(plain, inputs), outputs(model, inputs)):
        assert_close(ours, theirs, scale=10)


def test_save_merged_of_a_merged_model_writes_its_weights(tmp_path: Path) -> None:
    _, model = adapted_zoo()
    lp.merge(model)
    lp.save_merged(model, tmp_path / "m.safetensors")
    state = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(state[f"{p}.weight"], model.get_submodule(p).weight) for p in ZOO_KINDS)


def test_save_merged_refuses_tied_weights_and_handles_compiled_models(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight  # tied, as in language models
    compiled = torch.compile(model)
    lp.inject_lora(compiled, target="1", rank=2)
    randomize_adapters(compiled)
    # One tied tensor cannot hold both the plain and the merged weight.
    with pytest.raises(lp.StateError, match=r"save_merged: the weight of '1' with \['0'\] is "
                                            r"shared \(tied\)"):
        lp.save_merged(compiled, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    model[1].weight = nn.Parameter(model[0].weight.detach().clone())  # untied
    lp.save_merged(compiled, tmp_path / "m.safetensors")
    state = load_file(tmp_path / "m.safetensors")
    assert set(state) == {"0.weight", "1.weight"}  # no _orig_mod. prefix
    assert torch.equal(state["0.weight"], model[0].weight)
    assert not torch.equal(state["1.weight"], model[0].weight)


def test_save_merged_refuses_disabled_adapters(tmp_path: Path) -> None:
    _, model = adapted_zoo()
    with lp.disable_adapters(model), pytest.raises(lp.StateError, match="adapters are disabled"):
        lp.save_merged(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
