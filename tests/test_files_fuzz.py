"""Fuzzing the adapter file loader: configs, metadata, safetensors headers, legacy ``.bin``.

Every input either loads exactly (each layer's A and B equal the file's tensors in the
layer's dtype) or raises a loraplug error, never another exception and never a hang (a
deadline per example); a failed load leaves the model bit for bit as it was. The fast
suite runs a few dozen examples per source of bytes; ``-m slow`` runs many more.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load, save
from strategies import randomize_adapters, regexes
from test_files import assert_unchanged, snapshot
from torch import nn

import loraplug as lp

PREFIX = "base_model.model."
FAST = settings(max_examples=25, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=400, deadline=5000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 4), nn.Conv1d(4, 6, 3))


def good_files(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """A valid adapter's config, tensors and metadata (different ranks and alphas)."""
    model = base_model()
    lp.inject_lora(model, target=["0", "1"], rank=2, alpha=4, dropout=0.1)
    lp.inject_lora(model, target="2", rank=3, alpha=1)
    randomize_adapters(model)
    tensors = {PREFIX + k: v.clone() for k, v in lp.adapter_state_dict(model).items()}
    lp.save_adapter(model, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        metadata = dict(f.metadata())
    return config, tensors, metadata


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return good_files(tmp_path_factory.mktemp("good"))


# --------------------------------------------------------------------------- values
def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**400), 10**400),
    st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**40, 10**400, 1e39, 1e308, 1e-45, 0.5, 0.99]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), regexes,
    st.sampled_from(["LORA", "none", "all", "all-linear", "(.|.)*X", "(?i)0", "^0", "1", "2",
                     "(a)\\1", "0|1|2"]),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=4), regexes), inner,
                                            max_size=3)),
    max_leaves=6,
)
FIELDS = ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
          "exclude_modules", "rank_pattern", "alpha_pattern", "bias", "use_dora",
          "init_lora_weights", "layers_to_transform", "modules_to_save", "fan_in_fan_out",
          "runtime_config", "something_new"]


@st.composite
def config_texts(draw: st.DrawFn, config: dict[str, Any]) -> str:
    """A config: the good one with random fields replaced, or raw text."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "deep", "text"]))
    if kind == "deep":
        return '{"peft_type": "LORA", "r": ' + deep(draw(st.integers(30, 5000))) + "}"
    if kind == "text":
        return draw(st.text(max_size=40))
    edited = dict(config)
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
        if draw(st.booleans()):
            edited[name] = draw(json_values)
        else:
            edited.pop(name, None)
    return json.dumps(edited)


@st.composite
def metadatas(draw: st.DrawFn, metadata: dict[str, str]) -> dict[str, str]:
    edited = dict(metadata)
    keys = [*metadata, "loraplug.dropout", "other"]
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3)):
        value = draw(st.one_of(json_values.map(json.dumps), st.text(max_size=10),
                               st.integers(30, 5000).map(deep)))
        edited[key] = value
    return edited


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XX"]


@st.composite
def header_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """The good safetensors bytes with a header entry, its padding or the data changed."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header[name]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "drop",
                                      "body", "raw"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(-1, 2**40), max_size=4))
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-1, len(body) + 8), min_size=2,
                                                  max_size=2))
        elif field == "rename":
            header[draw(st.sampled_from([n.replace("1.", "2.") for n in names]
                                        + ["x.lora_A.weight", PREFIX + "9.lora_B.weight",
                                           PREFIX + "0.lora_A.weight"]))] = header.pop(name)
            names = sorted(k for k in header if k != "__metadata__")
        elif field == "drop" and len(names) > 1:
            header.pop(name)
            names.remove(name)
        elif field == "body":
            cut = draw(st.integers(0, len(body)))
            body = body[:cut] + draw(st.binary(max_size=16))
        elif field == "raw":
            text = json.dumps(header).encode()
            at = draw(st.integers(0, len(text) - 1))
            return struct.pack("<Q", len(text)) + text[:at] + bytes([draw(st.integers(0, 255))]) \
                + text[at + 1:] + body
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    return struct.pack("<Q", len(text)) + text + body


# --------------------------------------------------------------------------- the property
def file_tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return state[PREFIX + key] if PREFIX + key in state else state[key]


def check_load(directory: Path, state: dict[str, torch.Tensor] | None) -> None:
    """Load into a fresh model: exactly, or a loraplug error with the model unchanged."""
    model = base_model()
    before = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers = lp.load_adapter(model, directory)
    except lp.LoRAError:
        assert_unchanged(model, before)
        return
    assert state is not None, "a file that cannot be read whole was loaded"
    adapter = lp.adapter_names(model)[0]
    loaded = lp.adapter_state_dict(model, adapter)
    for path in layers:
        for key in (k for k in loaded if k.startswith(f"{path}.")):
            want = file_tensor(state, key)
            assert torch.equal(loaded[key], want.to(loaded[key].dtype)), key
    base_now = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert {k: torch.equal(v, before[0][k]) for k, v in base_now.items()} \
        == dict.fromkeys(base_now, True)


def write(directory: Path, config: str, weights: bytes, *, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    (directory / "adapter_config.json").write_text(config)
    (directory / name).write_bytes(weights)
    return directory


def run_config_case(good, tmp: Path, data) -> None:  # type: ignore[no-untyped-def]
    config, tensors, metadata = good
    text = data.draw(config_texts(config))
    directory = write(tmp, text, save(tensors, metadata=metadata),
                      name="adapter_model.safetensors")
    check_load(directory, tensors)


def run_metadata_case(good, tmp: Path, data) -> None:  # type: ignore[no-untyped-def]
    config, tensors, metadata = good
    edited = data.draw(metadatas(metadata))
    directory = write(tmp, json.dumps(config), save(tensors, metadata=edited),
                      name="adapter_model.safetensors")
    check_load(directory, tensors)


def run_header_case(good, tmp: Path, data) -> None:  # type: ignore[no-untyped-def]
    config, tensors, metadata = good
    weights = data.draw(header_edits(save(tensors, metadata=metadata)))
    directory = write(tmp, json.dumps(config), weights, name="adapter_model.safetensors")
    try:  # what the bytes hold, read independently of loraplug
        state = load(weights)
    except Exception:
        state = None
    check_load(directory, state)


BIN_VALUES = ["dense", "sparse", "meta", "int", "complex", "f8", "scalar", "empty", "list"]


def bin_value(kind: str, like: torch.Tensor) -> object:
    if kind == "sparse":
        return like.to_sparse()
    if kind == "meta":
        return like.to("meta")
    if kind == "int":
        return like.to(torch.int32)
    if kind == "complex":
        return like.to(torch.complex64)
    if kind == "f8":
        return like.to(torch.float8_e4m3fn)
    if kind == "scalar":
        return torch.tensor(1.0)
    if kind == "empty":
        return like[:0]
    if kind == "list":
        return [1, 2]
    return like.clone()


def run_bin_case(good, tmp: Path, data) -> None:  # type: ignore[no-untyped-def]
    config, tensors, _ = good
    state = {k: bin_value(data.draw(st.sampled_from(BIN_VALUES)), v) for k, v in tensors.items()}
    path = tmp / "build"
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: sparse tensors are beta
        torch.save(state, path / "adapter_model.bin")
    weights = (path / "adapter_model.bin").read_bytes()
    directory = write(tmp / "adapter", json.dumps(config), weights, name="adapter_model.bin")
    check_load(directory, state if all(isinstance(v, torch.Tensor) for v in state.values())
               else None)


CASES = {"config": run_config_case, "metadata": run_metadata_case, "header": run_header_case,
         "bin": run_bin_case}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("source", list(CASES))
@FAST
@given(data=st.data())
def test_fuzzed_files_load_exactly_or_raise_a_loraplug_error(
        good, tmp_path_factory: pytest.TempPathFactory, source: str, data) -> None:  # type: ignore[no-untyped-def]
    CASES[source](good, tmp_path_factory.mktemp(source), data)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("source", list(CASES))
@SLOW
@given(data=st.data())
def test_fuzzed_files_many_more(good, tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
                                source: str, data) -> None:
    CASES[source](good, tmp_path_factory.mktemp(source), data)


def test_the_good_files_load(good, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, tensors, metadata = good
    directory = write(tmp_path, json.dumps(config), save(tensors, metadata=metadata),
                      name="adapter_model.safetensors")
    model = base_model()
    assert lp.load_adapter(model, directory) == ["0", "1", "2"]
    check_load(directory, tensors)
