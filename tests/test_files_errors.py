"""Bad adapter files and state dicts: each gets a clear error, and the model is unchanged."""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from strategies import randomize_adapters
from test_files import PREFIX, adapted_zoo, assert_unchanged, snapshot, zoo
from torch import nn

import loraplug as lp


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A good adapter directory (from adapted_zoo) and a fresh base model to load it into."""
    base, model = adapted_zoo()
    lp.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", base


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, change, metadata: dict | None = None) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the weights after ``change(tensors)``, keeping the metadata unless given."""
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata() if metadata is None else metadata
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata=metadata)


def refused(model: nn.Module, path: Path, match: str, **kwargs: object) -> str:
    """Load must fail with ``match`` and leave ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(lp.AdapterFileError, match=match) as info:
        lp.load_adapter(model, path, **kwargs)  # type: ignore[arg-type]
    assert_unchanged(model, before)
    return str(info.value)


# --------------------------------------------------------------------------- the file itself
def test_truncated_safetensors(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    refused(base, path, r"adapter_model.safetensors is not a readable safetensors file .*"
                        r"truncated or corrupt")


def test_config_that_is_not_json(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    refused(base, path, r"adapter_config.json is not valid JSON")


def test_config_that_is_not_an_object(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    (path / "adapter_config.json").write_text("[1, 2]")
    refused(base, path, r"the config is a JSON list; expected an object")


def test_rank_that_disagrees_with_the_tensors(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    edit_config(path, r=5)
    message = refused(base, path, r"blocks.0.fc: A \(2, 6\) and B \(8, 2\) in the file, but rank 5 "
                                  r"\(from r\) needs A \(5, 6\) and B \(8, 5\); the tensors have "
                                  r"rank 2, so r in adapter_config.json disagrees")
    assert "rank_pattern" not in message.split("blocks.0.out")[0]
    edit_config(path, r=2, rank_pattern={"out": 1})
    refused(base, path, r"rank 1 \(from rank_pattern\['out'\]\)")


def test_key_for_a_module_the_model_lacks(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved

    def rename(tensors: dict) -> None:  # type: ignore[type-arg]
        for suffix in ("lora_A.weight", "lora_B.weight"):
            tensors[f"{PREFIX}blocks.0.fcc.{suffix}"] = tensors.pop(f"{PREFIX}blocks.0.fc.{suffix}")

    edit_tensors(path, rename)
    message = refused(base, path, r"blocks.0.fcc: the model has no module of that name. Close "
                                  r"module names: \['blocks.0.fc'")
    # and the module it should have named now lacks its tensors: both are reported
    assert "blocks.0.fc: target_modules selects it, but the file lacks" in message


def test_nan_loads_but_safe_merge_refuses(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved

    def poison(tensors: dict) -> None:  # type: ignore[type-arg]
        tensors[f"{PREFIX}blocks.1.out.lora_B.weight"][0, 0] = float("nan")

    edit_tensors(path, poison)
    lp.load_adapter(base, path)
    assert base.blocks[1]["out"].lora_B["default"].isnan().any()
    before = snapshot(base)
    with pytest.raises(lp.StateError, match=r"merge: 'blocks.1.out': merging \['default'\] "
                                            r"gives a weight with NaN or inf"):
        lp.merge(base)  # every merge is checked
    assert not any(m.merged for m in base.modules() if isinstance(m, lp.LoRALayer))
    # torch.equal is False for NaN, so compare the unchanged values NaN-aware.
    now = base.state_dict()
    assert all(torch.equal(now[k].nan_to_num(7.0), v.nan_to_num(7.0)) for k, v in before[0].items())


def test_pickle_with_code_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}))
    torch.save({"0.lora_A.weight": Payload(), "0.lora_B.weight": torch.zeros(2, 2)},
               path / "adapter_model.bin")
    model = nn.Sequential(nn.Linear(2, 2))
    refused(model, path, r"refused to load .*adapter_model.bin: PyTorch's tensor-only unpickler "
                         r"rejected it \(Trying to load unsupported GLOBAL posix.mkdir.*\)\. A "
                         r"pickle holding anything but tensors can run arbitrary code")
    assert not marker.exists()
    # The payload is real: plain unpickling runs it.
    torch.load(path / "adapter_model.bin", weights_only=False)
    assert marker.is_dir()


def test_bin_that_is_not_a_dict_or_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    model = nn.Sequential(nn.Linear(2, 2))
    torch.save([torch.zeros(1)], path / "adapter_model.bin")
    refused(model, path, r"adapter_model.bin holds a list; expected a dict key -> tensor")
    (path / "adapter_model.bin").write_bytes(b"garbage")
    refused(model, path, r"refused to load .*adapter_model.bin: PyTorch's tensor-only unpickler "
                         r"rejected it\. ")
    (path / "adapter_model.bin").write_bytes(b"PK\x03\x04 a broken zip")
    refused(model, path, r"adapter_model.bin is not a readable torch file")


def test_missing_paths_and_files(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    refused(model, tmp_path / "nowhere", r"nowhere is not an adapter directory")
    refused(model, tmp_path, r"has neither adapter_model.safetensors nor adapter_model.bin")
    save_file({"0.lora_A.weight": torch.zeros(1, 2)}, tmp_path / "adapter_model.safetensors")
    refused(model, tmp_path, r"has no adapter_config.json")


def test_empty_weights(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({}, tmp_path / "adapter_model.safetensors")
    refused(nn.Sequential(nn.Linear(2, 2)), tmp_path, r"adapter_model.safetensors holds no tensors")


# --------------------------------------------------------------------------- config fields
@pytest.mark.parametrize(("changes", "match"), [
    ({"use_dora": "yes"}, r"use_dora is 'yes'; expected true or false"),
    ({"use_dora": True, "lora_bias": True}, r"use_dora and lora_bias are both true"),
    ({"bias": "all"}, r"bias is 'all': bias='all' or 'lora_only' files carry trained base biases"),
    ({"modules_to_save": "head"}, r"modules_to_save is 'head'; expected a list of module"),
    ({"trainable_token_indices": {"emb": ["a"]}}, r"trainable_token_indices is \{'emb': "
                                                  r"\['a'\]\}; expected token ids"),
    ({"peft_type": "IA3"}, r"peft_type is 'IA3'; only LoRA adapters"),
    ({"r": 0}, r"r is 0; expected a positive integer"),
    ({"r": 2.5}, r"r is 2.5; expected a positive integer"),
    ({"lora_alpha": -1}, r"lora_alpha is -1; expected a finite number > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout is 1.0; expected a number in \[0, 1\)"),
    ({"use_rslora": "yes"}, r"use_rslora is 'yes'; expected true or false"),
    ({"rank_pattern": {"fc": 0}}, r"rank_pattern\['fc'\] is 0; expected a positive integer"),
    ({"rank_pattern": [1]}, r"rank_pattern is \[1\]; expected an object"),
    ({"alpha_pattern": {"(": 2}}, r"alpha_pattern key '\(' is not a valid regular expression"),
    ({"target_modules": 3}, r"target_modules is 3; expected a list of module names or a regex"),
    ({"target_modules": "fc("}, r"target_modules 'fc\(' is not a valid regular expression"),
    ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights is 'pissa_niter_4': the "
                                             r"adapter was trained on the residual"),
    ({"init_lora_weights": "corda"}, r"init_lora_weights is 'corda', which rewrites the base "
                                     r"weights from the activations of calibration data"),
    ({"init_lora_weights": "xavier"}, r"init_lora_weights is 'xavier'; expected one of PEFT's"),
])
def test_config_fields_that_cannot_be_honoured(saved: tuple[Path, nn.Module], changes: dict,
                                               match: str) -> None:
    path, base = saved
    edit_config(path, **changes)
    refused(base, path, r"nothing was changed:\n  - adapter_config.json: " + match)


@pytest.mark.parametrize(("changes", "match"), [
    ({"use_dora": True}, r"conv1: use_dora is true in the config, but the file lacks "
                         r"conv1.lora_magnitude_vector"),
    ({"lora_bias": True}, r"conv1: lora_bias is true in the config, but the file lacks "
                          r"conv1.lora_B.bias"),
    ({"modules_to_save": ["head"]}, r"modules_to_save names 'head', which matches no module"),
    ({"trainable_token_indices": {"fc": [1]}}, r"trainable_token_indices: 'fc' is no module"),
])
def test_config_fields_the_tensors_do_not_follow(saved: tuple[Path, nn.Module], changes: dict,
                                                  match: str) -> None:
    path, base = saved
    edit_config(path, **changes)
    refused(base, path, match)


def test_warnings_as_errors_leave_a_mixed_dropout_load_unchanged(tmp_path: Path) -> None:
    # Layers with different dropouts used to be injected group by group, so a warning for
    # a later group came after the first group was already in the model.
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model = copy.deepcopy(base)
    with pytest.warns(lp.LoRAWarning, match="the rank exceeds"):
        lp.inject_lora(model, target="0", rank=3, dropout=0.0)
        lp.inject_lora(model, target="1", rank=3, dropout=0.1)
    lp.save_adapter(model, tmp_path)
    before = snapshot(base)
    with pytest.warns(lp.LoRAWarning) as caught:
        lp.load_adapter(copy.deepcopy(base), tmp_path)
    assert [str(w.message) for w in caught] == [
        "the rank exceeds the rank ΔW can have on 1 (rank 3, at most 2); the extra parameters "
        "add cost without capacity. Consider a smaller rank."]
    with warnings.catch_warnings():
        warnings.simplefilter("error", lp.LoRAWarning)
        with pytest.raises(lp.LoRAWarning, match=r"the rank exceeds the rank ΔW can have on 1 "):
            lp.load_adapter(base, tmp_path)
    assert_unchanged(base, before)


def test_every_problem_is_reported_at_once(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    edit_config(path, use_dora="maybe", bias="lora_only")

    def damage(tensors: dict) -> None:  # type: ignore[type-arg]
        del tensors[f"{PREFIX}conv1.lora_B.weight"]
        tensors[f"{PREFIX}conv1.lora_B.default.bias"] = torch.ones(4)

    edit_tensors(path, damage)
    message = refused(base, path, "use_dora is 'maybe'")
    assert "bias is 'lora_only'" in message
    assert "unexpected key 'base_model.model.conv1.lora_B.default.bias': B's bias of an adapter " \
        "saved with PEFT's lora_bias=true, under a model.state_dict() name" in message


def test_unknown_config_fields_warn(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    edit_config(path, shiny_new_option=3, harmless_new_option=None)
    with pytest.warns(lp.LoRAWarning, match=r"fields loraplug does not know: "
                                            r"\['shiny_new_option'\]; they were ignored"):
        lp.load_adapter(base, path)


def test_regex_targets_exclusions_and_patterns_follow_peft(tmp_path: Path) -> None:
    base = zoo()
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=["blocks.0.*"], rank=3, alpha=6)
    lp.inject_lora(model, target=["blocks.1.fc"], rank=1, alpha=6)
    randomize_adapters(model)
    lp.save_adapter(model, tmp_path)
    # As PEFT users write them: a regex target, a suffix exclusion, unanchored patterns.
    edit_config(tmp_path, target_modules=r"blocks\.\d\.(fc|out)", exclude_modules=["1.out"],
                rank_pattern={"1.fc": 1}, alpha_pattern={})
    with pytest.warns(lp.LoRAWarning, match=r"edited config\): rank_pattern is \{'1.fc': 1\}"):
        loaded = lp.load_adapter(base, tmp_path)
    assert loaded == ["blocks.0.fc", "blocks.0.out", "blocks.1.fc"]
    assert [base.get_submodule(p).rank["default"] for p in
            ("blocks.0.fc", "blocks.0.out", "blocks.1.fc")] == [3, 3, 1]


def test_targets_and_keys_must_agree(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    edit_config(path, target_modules=["fc", "out", "emb", "conv1", "conv2", "conv3"])
    message = refused(base, path, r"grouped: the file has tensors for it, but target_modules / "
                                  r"exclude_modules in adapter_config.json do not select it")
    edit_config(path, target_modules=["fc", "out", "emb", "conv1", "conv2", "conv3", "grouped",
                                      "conv"])
    assert "grouped" in message
    base.add_module("conv", nn.Conv2d(1, 1, 1))
    refused(base, path, r"conv: target_modules selects it, but the file lacks "
                        r"conv.lora_A.weight and conv.lora_B.weight")


def test_layer_restrictions_and_all_linear_let_the_keys_decide(
        saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    # The file holds every layer of ZOO_KINDS; these configs select more modules.
    edit_config(path, target_modules=["fc", "out", "emb", "conv1", "conv2", "conv3", "grouped",
                                      "extra"], layers_to_transform=[0, 1])
    base.add_module("extra", nn.Linear(2, 2))
    lp.load_adapter(copy.deepcopy(base), path)
    edit_config(path, target_modules="all-linear", layers_to_transform=None)
    lp.load_adapter(copy.deepcopy(base), path)
    edit_config(path, target_modules=None)
    lp.load_adapter(copy.deepcopy(base), path)
    edit_config(path, target_modules=["fc", "out", "emb", "conv1", "conv2", "conv3", "grouped",
                                      "extra"])
    refused(base, path, r"extra: target_modules selects it, but the file lacks")


# --------------------------------------------------------------------------- keys and shapes
def test_missing_unexpected_and_wrong_kind_keys(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved

    def damage(tensors: dict) -> None:  # type: ignore[type-arg]
        del tensors[f"{PREFIX}blocks.0.out.lora_A.weight"]
        tensors[f"{PREFIX}emb.lora_A.weight"] = tensors.pop(f"{PREFIX}emb.lora_embedding_A")
        tensors[f"{PREFIX}blocks.1.fc.lora_A.default"] = torch.zeros(1)
        tensors[f"{PREFIX}conv1.lora_embedding_A"] = torch.zeros(1)
        tensors[f"{PREFIX}conv3.lora_B.weight"] = tensors[f"{PREFIX}conv3.lora_B.weight"].long()

    edit_tensors(path, damage)
    message = refused(base, path, r"blocks.0.out: missing key blocks.0.out.lora_A.weight")
    assert ("emb: key 'base_model.model.emb.lora_A.weight' is the wrong kind for a LoRAEmbedding, "
            "whose tensors are named emb.lora_embedding_A and emb.lora_embedding_B") in message
    assert "it names an adapter inside the key, as model.state_dict() does" in message
    assert ("conv1: both 'base_model.model.conv1.lora_A.weight' and "
            "'base_model.model.conv1.lora_embedding_A' give its lora_A") in message
    assert "conv3: 'base_model.model.conv3.lora_B.weight' has dtype torch.int64" in message


def test_peft_grouped_conv_layout_loads_and_refuses_to_merge(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}))
    # PEFT's shapes for this layer: A (r, in, 3, 3) ungrouped, B (out, r/groups, 1, 1).
    save_file({"base_model.model.0.lora_A.weight": torch.randn(2, 4, 3, 3),
               "base_model.model.0.lora_B.weight": torch.randn(6, 1, 1, 1)},
              tmp_path / "adapter_model.safetensors")
    assert lp.load_adapter(model, tmp_path) == ["0"]
    assert model[0].lora_A["default"].shape == (2, 4, 3, 3)
    reason = (r"PEFT's layout for grouped convolutions \(A reads all 4 input channels, "
              r"groups=2\), whose ΔW is not block diagonal")
    with pytest.raises(lp.StateError, match=rf"merge: layers \['0'\] .*{reason}"):
        lp.merge(model)
    with pytest.raises(lp.StateError, match=rf"a LoRAConv2d cannot be merged: .*{reason}"):
        model[0].merge()
    with pytest.raises(lp.StateError, match=rf"ΔW has no weight-shaped form: it is in {reason}"):
        model[0].delta_weight("default")


def test_shapes_for_another_model(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    other = zoo()
    other.blocks[0]["fc"] = nn.Linear(6, 9)
    refused(other, path, r"blocks.0.fc: A \(2, 6\) and B \(8, 2\) in the file, but rank 2 "
                         r"\(from r\) needs A \(2, 6\) and B \(9, 2\); the file was saved for a "
                         r"layer of another shape")


def test_unsupported_module_type(tmp_path: Path) -> None:
    model = nn.Sequential(nn.LayerNorm(3))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
    save_file({"0.lora_A.weight": torch.zeros(1, 3), "0.lora_B.weight": torch.zeros(3, 1)},
              tmp_path / "adapter_model.safetensors")
    refused(model, tmp_path, r"0 is a nn.LayerNorm, which has no LoRA layer; supported: ")


def test_base_weights_peft_saves_for_embeddings(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    # PEFT adds <path>.base_layer.weight for targeted embedding layers: a copy of the base.
    edit_tensors(path, lambda t: t.update({f"{PREFIX}emb.base_layer.weight": base.emb.weight}))
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.emb.weight[3] += 1
    refused(changed, path, r"'base_model.model.emb.base_layer.weight' holds a base weight for "
                           r"emb.weight .* differs from the model's emb.weight \(11, 6\)")
    lp.load_adapter(base, path)  # equal to the model's own: nothing to load
    edit_tensors(path, lambda t: t.update({f"{PREFIX}head.weight": torch.zeros(1)}))
    refused(zoo(), path, r"unexpected key 'base_model.model.head.weight': a full module weight")


# --------------------------------------------------------------------------- model state
def test_loading_into_merged_layers_or_a_taken_name(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    lp.load_adapter(base, path)
    # The taken name is one problem, said once (not again for every layer that has it).
    message = refused(base, path, r"nothing was changed:\n  - the model already has an adapter "
                                  r"named 'default'; load under another name \(name='...'\) or "
                                  r"delete it first with loraplug.delete_adapter")
    assert message.count("\n  - ") == 1
    lp.merge(base)
    lp.unmerge(base)
    lp.merge(base)
    refused(base, path, r"'conv1' has \['default'\] merged; call loraplug.unmerge", name="second")
    refused(base, path, r"adapter name must be a non-empty string without dots", name="a.b")


def test_a_name_taken_on_other_layers_is_refused(saved: tuple[Path, nn.Module]) -> None:
    """A file's 'default' on other layers than the model's 'default' must not mix with it."""
    path, _ = saved
    model = zoo()
    model.extra = nn.Linear(2, 2)
    lp.inject_lora(model, target="extra", rank=2)  # "default" on a layer the file lacks
    refused(model, path, r"the model already has an adapter named 'default'; load under another")
    lp.load_adapter(model, path, name="other")
    assert lp.adapter_names(model) == ["default", "other"]


def test_metadata_problems(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    edit_tensors(path, lambda t: None, metadata={"format": "pt", "loraplug.format": "9",
                                                 "loraplug.version": "9.0"})
    refused(base, path, r"written in loraplug file format '9' \(loraplug 9.0\); this version "
                        r"reads format '1'. Upgrade loraplug")
    edit_tensors(path, lambda t: None, metadata={"format": "pt", "loraplug.format": "1",
                                                 "loraplug.dropout": "[0.1]"})
    refused(base, path, r"metadata loraplug.dropout is '\[0.1\]'; expected a JSON object")


# --------------------------------------------------------------------------- state dicts
def test_load_adapter_state_dict_problems() -> None:
    base, model = adapted_zoo()
    state = lp.adapter_state_dict(model)
    target = copy.deepcopy(base)

    def refuse(state: object, match: str, name: str = "default") -> None:
        before = snapshot(target)
        with pytest.raises(lp.AdapterFileError, match=match):
            lp.load_adapter_state_dict(target, state, name=name)  # type: ignore[arg-type]
        assert_unchanged(target, before)

    refuse(list(state.items()), r"state is a list; expected a mapping")
    refuse(state, r"the model has no adapter 'default' \(it has \[\]\); inject it first")
    lp.inject_lora(target, target=["blocks.*", "conv1"], rank=2)
    bad = dict(state)
    bad["blocks.0.fc.lora_A.weight"] = "text"
    bad[3] = torch.zeros(1)
    with pytest.raises(lp.AdapterFileError) as info:
        lp.load_adapter_state_dict(target, bad)
    message = str(info.value)
    for expected in ("'blocks.0.fc.lora_A.weight' holds a str, not a tensor",
                     "key 3 is not a string",
                     "emb: the model has no layer with adapter 'default' there",
                     "blocks.0.out: shapes A (3, 8), B (6, 3) in the state; adapter 'default' "
                     "(rank 2) has A (2, 8), B (6, 2)"):
        assert expected in message
    partial = {k: v for k, v in state.items() if k.startswith("conv1.")}
    refuse(partial, r"blocks.0.fc: missing keys blocks.0.fc.lora_A.weight and "
                    r"blocks.0.fc.lora_B.weight")
    lp.merge(target)
    refuse({}, r"adapter 'default' is merged into \['blocks.0.fc', .*Call loraplug.unmerge")


# --------------------------------------------------------------------------- saving
def test_save_errors(tmp_path: Path) -> None:
    _, model = adapted_zoo()
    with pytest.raises(lp.AdapterError, match=r"save_adapter: unknown adapter name\(s\) \['x'\]"):
        lp.save_adapter(model, tmp_path / "a", name="x")
    (tmp_path / "file").write_text("")
    with pytest.raises(lp.AdapterFileError, match=r"cannot create directory .*file"):
        lp.save_adapter(model, tmp_path / "file")
    lp.inject_lora(model, target="conv1", rank=1, name="mixed")
    lp.inject_lora(model, target="conv2", rank=1, name="mixed", use_rslora=True)
    with pytest.raises(lp.AdapterFileError, match=r"adapter 'mixed' has use_rslora \{'False': "
                                                  r"\['conv1'\], 'True': \['conv2'\]\} on "
                                                  r"different layers; PEFT's config has one"):
        lp.save_adapter(model, tmp_path / "mixed", name="mixed")
    with pytest.raises(lp.AdapterFileError, match=r"save_merged could not write .*file/m"):
        lp.save_merged(model, tmp_path / "file" / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_pickle_payload_file_is_not_a_valid_adapter_either(tmp_path: Path) -> None:
    # A plain pickle (not torch.save's zip format) is refused the same way.
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"x": os.getcwd}))
    refused(nn.Sequential(nn.Linear(2, 2)), path, r"refused to load .*tensor-only unpickler")


def test_weights_and_config_from_different_saves_are_refused(tmp_path: Path) -> None:
    """A save interrupted between its two renames leaves new weights beside an old config."""
    _, model = adapted_zoo()
    lp.save_adapter(model, tmp_path / "old")
    model.conv1.set_scale("default", 16.0)  # the next save changes alpha of one layer
    lp.save_adapter(model, tmp_path / "new")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(
        (tmp_path / "new" / "adapter_model.safetensors").read_bytes())
    old_config = (tmp_path / "old" / "adapter_config.json").read_bytes()
    (torn / "adapter_config.json").write_bytes(old_config)
    with pytest.warns(lp.LoRAWarning, match=r"adapter_config.json and the weights come from "
                                             r"different saves .*alpha_pattern is .* in the "
                                             r"config but was"):
        lp.load_adapter(zoo(), torn)
    lp.load_adapter(zoo(), tmp_path / "new")  # an intact pair loads without a warning


def test_earlier_grouped_conv_layout_loads_with_the_same_delta(tmp_path: Path) -> None:
    # loraplug's earlier grouped layout: A (r, in/g, k…) split by group, B (out, r/g, 1…);
    # group G used rows G·r/g … of A. It loads as A shared, B zero outside each group.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    a, b = torch.randn(2, 2, 3, 3), torch.randn(6, 1, 1, 1)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}))
    save_file({"0.lora_A.weight": a, "0.lora_B.weight": b}, tmp_path / "adapter_model.safetensors")
    lp.load_adapter(model, tmp_path)
    blocks = [b[3 * g:3 * g + 3].reshape(3, 1) @ a[g].reshape(1, -1) for g in range(2)]
    expected = torch.cat(blocks).reshape(6, 2, 3, 3)
    torch.testing.assert_close(model[0].delta_weight("default"), expected)
