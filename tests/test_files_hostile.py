"""Hostile adapter files and arguments: each is refused with a clear error, in bounded time,
and leaves the model exactly as it was."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from strategies import randomize_adapters
from test_files import assert_unchanged, snapshot
from torch import nn

import loraplug as lp
from loraplug import _regex
from loraplug._cli import main

PREFIX = "base_model.model."


def two_blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                         nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    """An adapter on every Linear of ``two_blocks`` saved to a directory, and a fresh base."""
    base = two_blocks()
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=nn.Linear, rank=2)
    randomize_adapters(model)
    lp.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", base


def write_config(path: Path, text: str) -> None:
    (path / "adapter_config.json").write_text(text)


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    write_config(path, json.dumps(config))


def refused(model: nn.Module, path: Path, match: str) -> str:
    before = snapshot(model)
    with pytest.raises(lp.AdapterFileError, match=match) as info:
        lp.load_adapter(model, path)
    assert_unchanged(model, before)
    return str(info.value)


# --------------------------------------------------------------------------- regexes (item 12)
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern",
                                   "alpha_pattern"])
def test_a_catastrophic_config_regex_does_not_hang_the_loader(tmp_path: Path, field: str) -> None:
    # re.fullmatch("(.|.)*X", name) backtracks for minutes on this 45-character name.
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict([("a" * 45, nn.Linear(4, 4)), ("out", nn.Linear(4, 4))]))
    model = copy.deepcopy(base)
    lp.inject_lora(model, target="*", rank=2)
    lp.save_adapter(model, tmp_path)
    pattern = "(.|.)*X"
    edit_config(tmp_path, **{field: {pattern: 3} if field.endswith("pattern") else pattern})
    start = time.perf_counter()
    if field == "target_modules":  # it selects nothing: refused
        refused(base, tmp_path, r"target_modules / exclude_modules in adapter_config.json do "
                                r"not select it")
    else:  # it matches nothing: loaded as saved
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lp.LoRAWarning)  # the edited rank/alpha pattern
            lp.load_adapter(base, tmp_path)
        x = torch.randn(3, 4)
        assert torch.equal(base(x), model(x))
    assert time.perf_counter() - start < 5


def test_regex_work_past_the_limit_is_refused(saved: tuple[Path, nn.Module],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path, base = saved
    monkeypatch.setattr(_regex, "MAX_WORK", 50)
    edit_config(path, target_modules="(?:[0-9.]?){20}")
    refused(base, path, r"adapter_config.json: the regex '\(\?:\[0-9\.\]\?\)\{20\}': matching "
                        r"it against the module names took more than 50 automaton steps; name "
                        r"the modules in a list instead\.")


@pytest.mark.parametrize(("changes", "match"), [
    ({"target_modules": r"(\d)\.\1"},
     r"target_modules '\(\\\\d\)\\\\.\\\\1' is refused: a backreference cannot be matched in "
     r"bounded time. Regexes in adapter files are matched in bounded time"),
    ({"exclude_modules": "(?>0)"}, r"exclude_modules '\(\?>0\)' is refused: an atomic group"),
    ({"rank_pattern": {"(?i)0": 4}},
     r"rank_pattern key '\(\?i\)0' is not a valid regular expression once PEFT embeds it as "
     r"\(\.\*\\\.\)\?\(KEY\)\$ \(global flags not at the start of the expression"),
    ({"alpha_pattern": {"0{99999}": 4}},
     r"alpha_pattern key '0\{99999\}' is refused once PEFT embeds it as .*: it needs more than "
     r"20000 automaton states"),
])
def test_config_regexes_without_a_bounded_meaning_are_refused(
        saved: tuple[Path, nn.Module], changes: dict, match: str) -> None:
    path, base = saved
    edit_config(path, **changes)
    refused(base, path, r"nothing was changed:\n  - adapter_config.json: " + match)


# --------------------------------------------------------------------------- JSON (item 14)
@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_config_json_is_refused(saved: tuple[Path, nn.Module], depth: int) -> None:
    path, base = saved
    write_config(path, '{"peft_type": "LORA", "runtime_config": ' + "[" * depth + "]" * depth
                 + "}")
    refused(base, path, r"adapter_config.json: it nests objects or arrays deeper than 32 "
                        r"levels; PEFT's LoRA config is a flat object")


def test_deeply_nested_metadata_json_is_refused_or_reported(saved: tuple[Path, nn.Module]) -> None:
    path, base = saved
    weights = path / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(weights).items()}
    deep = "[" * 100_000 + "]" * 100_000
    save_file(tensors, weights, metadata={"format": "pt", "loraplug.format": "1",
                                          "loraplug.dropout": deep})
    refused(base, path, r"metadata loraplug.dropout is '\[\[\[.*; expected a JSON object of "
                        r"dropout probabilities")
    save_file(tensors, weights, metadata={"format": "pt", "loraplug.format": "1",
                                          "loraplug.config": deep})
    with pytest.warns(lp.LoRAWarning, match=r"metadata loraplug.config is not usable JSON \(it "
                                            r"nests objects or arrays deeper than 32 levels\)"):
        lp.load_adapter(base, path)


# --------------------------------------------------------------------------- numbers (item 14)
BIG = 10**400
FLOAT32_RANGE = r"within float32's range 1\.175e-38 to 3\.403e\+38"


@pytest.mark.parametrize(("changes", "match"), [
    ({"lora_alpha": BIG}, r"lora_alpha is 1000+; expected a finite number > 0, " + FLOAT32_RANGE),
    ({"lora_alpha": 1e39}, r"lora_alpha is 1e\+39; expected a finite number > 0"),
    ({"lora_alpha": 1e300}, r"lora_alpha is 1e\+300; expected a finite number > 0"),
    ({"lora_alpha": 1e-45}, r"lora_alpha is 1e-45; expected a finite number > 0"),
    ({"lora_dropout": BIG}, r"lora_dropout is 1000+; expected a number in \[0, 1\)"),
    ({"alpha_pattern": {"0": BIG}}, r"alpha_pattern\['0'\] is 1000+; expected a finite number"),
    ({"alpha_pattern": {"0": 1e39}}, r"alpha_pattern\['0'\] is 1e\+39; expected a finite"),
    ({"r": BIG}, r"r is 1000+; expected a positive integer, at most 2147483647"),
    ({"rank_pattern": {"0": 2**40}}, r"rank_pattern\['0'\] is 1099511627776; expected a "
                                     r"positive integer, at most 2147483647"),
])
def test_numbers_beyond_float_range_are_refused(saved: tuple[Path, nn.Module], changes: dict,
                                                match: str) -> None:
    path, base = saved
    edit_config(path, **changes)
    refused(base, path, r"nothing was changed:\n  - adapter_config.json: " + match)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": BIG}, r"rank must be a positive int; received an integer of 1329 bits"),
    ({"rank": 2**40}, r"rank must be a positive int; received 1099511627776\. .*at most "
                      r"2147483647"),
    ({"rank": 2, "alpha": BIG}, r"alpha must be a finite number > 0; received an integer of "
                                r"1329 bits\. .*must fit a float32"),
    ({"rank": 2, "alpha": 1e39}, r"alpha must be a finite number > 0; received 1e\+39"),
    ({"rank": 2, "alpha": 1e300}, r"alpha must be a finite number > 0; received 1e\+300"),
    ({"rank": 2, "dropout": BIG}, r"dropout must be a number in \[0, 1\); received an integer "
                                  r"of 1329 bits"),
])
def test_inject_refuses_numbers_it_cannot_compute_with(kwargs: dict, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=match):
        lp.inject_lora(model, target="0", **kwargs)
    assert_unchanged(model, before)


def test_the_largest_accepted_alpha_computes_forward_and_merge() -> None:
    # alpha up to float32's largest value: the scaled branch is computed, merge works.
    model = nn.Sequential(nn.Linear(4, 4))
    lp.inject_lora(model, target="0", rank=1, alpha=3.4e38)
    model(torch.randn(2, 4))
    lp.merge(model)


def test_a_rank_whose_adapter_cannot_fit_in_memory_is_refused() -> None:
    # rank 2**30 on a 1024×1024 layer: A and B would need 8 TiB.
    model = nn.Sequential(nn.Linear(1024, 1024))
    before = snapshot(model)
    with pytest.raises(lp.ConfigError, match=r"'0' \(nn\.Linear\): rank 1073741824 needs "
                                             r"8,192\.0 GiB for A \(1073741824, 1024\) and B "
                                             r"\(1024, 1073741824\), more than the .* GiB of the "
                                             r"cpu device\. Use a smaller rank; a rank above 1024 "
                                             r"adds nothing on this layer\."):
        lp.inject_lora(model, target="0", rank=2**30)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- tensors (items 9, 16)
def _odd_tensors() -> dict[str, tuple[dict[str, object], str]]:
    a, b = torch.randn(2, 4), torch.randn(4, 2)
    return {
        "sparse": ({"A": a.to_sparse(), "B": b.to_sparse()},
                   r"is a sparse tensor \(layout torch\.sparse_coo\); expected a dense float "
                   r"tensor: convert it with \.to_dense\(\)"),
        "csr": ({"A": a.to_sparse_csr(), "B": b},
                r"is a sparse tensor \(layout torch\.sparse_csr\)"),
        "meta": ({"A": a.to("meta"), "B": b.to("meta")},
                 r"is a tensor on the meta device \(a shape without data\)"),
        "nested": ({"A": torch.nested.nested_tensor([a[0], a[1]]), "B": b},
                   r"is a nested tensor; expected a dense float tensor"),
        "complex": ({"A": a.to(torch.complex64), "B": b},
                    r"has dtype torch\.complex64; expected a float tensor"),
        "int": ({"A": a.to(torch.int64), "B": b}, r"has dtype torch\.int64; expected a float"),
    }


ODD_KINDS = ("sparse", "csr", "meta", "nested", "complex", "int")


def write_bin(path: Path, tensors: dict[str, object]) -> Path:
    path.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    state = {f"{PREFIX}0.lora_{slot}.weight": value for slot, value in tensors.items()}
    torch.save(state, path / "adapter_model.bin")
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: sparse and nested are beta
@pytest.mark.parametrize("kind", ODD_KINDS)
def test_legacy_bin_with_unusable_tensors_is_refused(tmp_path: Path, kind: str) -> None:
    tensors, match = _odd_tensors()[kind]
    path = write_bin(tmp_path / kind, tensors)
    model = nn.Sequential(nn.Linear(4, 4))
    refused(model, path, r"nothing was changed:\n  - 0: 'base_model\.model\.0\.lora_A\.weight' "
                         + match)
    assert type(model[0]) is nn.Linear  # no half-loaded layer


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ODD_KINDS)
def test_inspect_reports_unusable_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          kind: str) -> None:
    tensors, match = _odd_tensors()[kind]
    path = write_bin(tmp_path / kind, tensors)
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert problems
    assert all(line.startswith("problem: 0: 'base_model.model.0.lora_") for line in problems)
    assert re.search(match, problems[0])


@pytest.mark.parametrize(("tensors", "problem"), [
    ({"A": torch.tensor(1.0), "B": torch.zeros(4, 2)},
     "problem: 0: A has shape () and B (4, 2); an adapter's A is (r, in…) and its B (out, r…)"),
    ({"A": torch.zeros(0, 4), "B": torch.zeros(4, 0)},
     "problem: 0: A (0, 4) and B (4, 0) have rank 0, an empty adapter; a rank is at least 1"),
])
def test_inspect_reports_shapes_that_are_no_adapter(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tensors: dict, problem: str) -> None:
    path = write_bin(tmp_path / "odd", tensors)
    assert main(["inspect", str(path)]) == 1
    assert problem in capsys.readouterr().out.splitlines()


def test_inspect_and_load_read_float8_adapters(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    a, b = torch.randn(2, 4), torch.randn(4, 2)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e5m2)
    path = tmp_path / "f8"
    path.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"{PREFIX}0.lora_A.weight": a8, f"{PREFIX}0.lora_B.weight": b8},
              path / "adapter_model.safetensors")
    assert main(["inspect", str(path)]) == 0
    assert "float8_e4m3fn/float8_e5m2" in capsys.readouterr().out
    model = nn.Sequential(nn.Linear(4, 4))
    lp.load_adapter(model, path)
    assert torch.equal(model[0].lora_A["default"], a8.float())
    assert torch.equal(model[0].lora_B["default"], b8.float())


def test_a_base_weight_key_holding_a_meta_tensor_is_refused(tmp_path: Path) -> None:
    # PEFT may save base weights beside the adapter; comparing a meta tensor would raise.
    path = write_bin(tmp_path / "w", {"A": torch.zeros(2, 4), "B": torch.zeros(4, 2)})
    state = torch.load(path / "adapter_model.bin", weights_only=True)
    state[f"{PREFIX}0.weight"] = torch.zeros(4, 4, device="meta")
    torch.save(state, path / "adapter_model.bin")
    refused(nn.Sequential(nn.Linear(4, 4)), path,
            r"'base_model\.model\.0\.weight' is a tensor on the meta device .* \(a full module "
            r"weight or bias, which a LoRA adapter does not carry\)\.")


# --------------------------------------------------------------------------- the model (8, 10)
class Shared(nn.Module):
    """One Linear reachable at two paths, ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def shared_file(path: Path, *, same: bool, target: object = ("a", "b")) -> dict:
    tensors = {f"{PREFIX}a.lora_A.weight": torch.randn(2, 4),
               f"{PREFIX}a.lora_B.weight": torch.randn(4, 2)}
    for slot in "AB":
        value = tensors[f"{PREFIX}a.lora_{slot}.weight"]
        other = value.clone() if same else torch.randn_like(value)
        tensors[f"{PREFIX}b.lora_{slot}.weight"] = other
    path.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": target}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return tensors


def test_one_shared_module_given_different_tensors_is_refused(tmp_path: Path) -> None:
    shared_file(tmp_path / "s", same=False)
    model = Shared()
    message = refused(model, tmp_path / "s", r"nothing was changed:\n  - a and b are one module "
                                             r"\(the same object at both paths\), which carries "
                                             r"one adapter, but the file gives it different "
                                             r"tensors or hyperparameters under each path\. Keep "
                                             r"one path's keys in the file \(remove those of b\)")
    assert message.count("\n  - ") == 1


def test_one_shared_module_given_the_same_tensors_loads_once(tmp_path: Path) -> None:
    tensors = shared_file(tmp_path / "s", same=True)
    model = Shared()
    assert lp.load_adapter(model, tmp_path / "s") == ["a"]
    assert model.a is model.b
    assert torch.equal(model.a.lora_A["default"], tensors[f"{PREFIX}a.lora_A.weight"])
    assert torch.equal(model.b.lora_B["default"], tensors[f"{PREFIX}b.lora_B.weight"])


def test_a_shared_module_saved_under_one_path_loads_with_a_regex_selecting_both(
        tmp_path: Path) -> None:
    model = Shared()
    lp.inject_lora(model, target="a", rank=2)
    randomize_adapters(model)
    lp.save_adapter(model, tmp_path)
    edit_config(tmp_path, target_modules="a|b")  # PEFT visits a shared module once
    fresh = Shared()
    assert lp.load_adapter(fresh, tmp_path) == ["a"]
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), model(x))


def test_mixed_dropout_load_under_all_warnings_as_errors_changes_nothing(tmp_path: Path) -> None:
    # Layers with different dropouts were injected group by group: with every warning an
    # error, a warning for a later group came after the first group was in the model.
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lp.LoRAWarning)
        lp.inject_lora(model, target="0", rank=3, dropout=0.0)
        lp.inject_lora(model, target=["1", "2"], rank=3, dropout=0.1)
    lp.save_adapter(model, tmp_path)
    edit_config(tmp_path, shiny_new_option=1)  # a second warning, about the config
    before = snapshot(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(lp.LoRAWarning, match="fields loraplug does not know"):
            lp.load_adapter(base, tmp_path)
    assert_unchanged(base, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lp.LoRAWarning)
        lp.load_adapter(base, tmp_path)
    assert [base[i].dropout["default"] for i in range(3)] == [0.0, 0.1, 0.1]


# --------------------------------------------------------------------------- wording, paths (18)
def test_an_exclude_that_removes_every_match_names_the_exclusion() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = snapshot(model)
    for target, exclude, shown in (("0", "0", r"\(0\)"), (nn.Linear, ["0", "2"], r"\(0, 2\)")):
        match = (r"exclude .* removes every layer of a supported type that target selects "
                 + shown + r", so nothing is left to adapt\. Narrow the exclude or widen the "
                 r"target")
        with pytest.raises(lp.TargetError, match=match):
            lp.inject_lora(model, target=target, exclude=exclude, rank=2)
        with pytest.raises(lp.TargetError, match=match):
            lp.find_targets(model, target, exclude=exclude)
    assert_unchanged(model, before)


def test_a_failed_second_rename_says_what_loading_then_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = two_blocks()
    model = copy.deepcopy(base)
    lp.inject_lora(model, target=nn.Linear, rank=2, alpha=2)
    lp.save_adapter(model, tmp_path)
    newer = copy.deepcopy(base)
    lp.inject_lora(newer, target=nn.Linear, rank=2, alpha=4)
    randomize_adapters(newer)
    real_replace, calls = os.replace, []

    def second_fails(src, dst):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(lp.AdapterFileError, match=r"if only some were replaced, load_adapter "
                                                  r"warns that the config and the weights come "
                                                  r"from different saves \(and refuses them if "
                                                  r"their shapes disagree\)\. Save again\."):
        lp.save_adapter(newer, tmp_path)
    monkeypatch.undo()
    with pytest.warns(lp.LoRAWarning, match=r"come from different saves .* lora_alpha is 2 in "
                                            r"the config but was 4 when the weights were written"):
        lp.load_adapter(base, tmp_path)  # what the message promises: a warning, then loaded


def test_saving_to_an_empty_path_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is the current directory: the adapter used to land there.
    model = nn.Sequential(nn.Linear(4, 4))
    lp.inject_lora(model, target="0", rank=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(lp.ConfigError, match=r"save_adapter: path must be a non-empty str or "
                                             r"pathlib\.Path; received str ''"):
        lp.save_adapter(model, "")
    assert list(tmp_path.iterdir()) == []


SAVE_TWICE = """
import sys, torch
from torch import nn
import loraplug as lp
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
lp.inject_lora(model, target="0", rank=2, dropout=0.1)
lp.inject_lora(model, target=["1", "2"], rank=3, alpha=5, dropout=0.2)
lp.save_adapter(model, sys.argv[1])
"""


def save_twice_script(out: Path) -> str:
    return SAVE_TWICE.replace("sys.argv[1]", repr(str(out)))


def test_saving_the_same_adapter_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    # The metadata has five keys; safetensors writes them in hash order, which changed
    # from one call to the next.
    files = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        exec(compile(save_twice_script(out), "save", "exec"), {})
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert sorted(files[0]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert files[0] == files[1] == files[2]


@pytest.mark.slow
def test_saves_in_two_processes_give_the_same_bytes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PYTHONWARNINGS": "ignore"}
    files = []
    for run, seed in enumerate(("1", "2")):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, "-c", save_twice_script(out)],
                       env={**env, "PYTHONHASHSEED": seed}, check=True)
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert files[0] == files[1]


def test_load_adapter_state_dict_refuses_unusable_tensors() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    lp.inject_lora(model, target="0", rank=2)
    state = {k: v.clone() for k, v in lp.adapter_state_dict(model).items()}
    state["0.lora_A.weight"] = state["0.lora_A.weight"].to("meta")
    before = snapshot(model)
    with pytest.raises(lp.AdapterFileError, match=r"0: '0\.lora_A\.weight' is a tensor on the "
                                                  r"meta device"):
        lp.load_adapter_state_dict(model, state)
    assert_unchanged(model, before)


def test_inspect_reports_a_regex_past_the_work_limit(
        saved: tuple[Path, nn.Module], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved
    monkeypatch.setattr(_regex, "MAX_WORK", 20)
    edit_config(path, rank_pattern={"(?:[0-9.]?){20}": 2})
    assert main(["inspect", str(path)]) == 1
    assert ("problem: adapter_config.json: the regex '(?:[0-9.]?){20}': matching it against the "
            "module names took more than 20 automaton steps; name the modules in a list instead"
            in capsys.readouterr().out.splitlines())
