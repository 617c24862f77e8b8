"""Target resolution against an obviously-correct matcher, and its errors."""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loraplug as lp


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.q_proj(x) + self.v_proj(x)))


def make_model() -> nn.Module:
    model = nn.Module()
    model.embed = nn.Embedding(10, 8)
    model.layers = nn.ModuleList([Block() for _ in range(3)])
    model.head = nn.Linear(8, 4)
    return model


SUPPORTED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def brute_force(model: nn.Module, globs: list[str]) -> list[str]:
    """Every supported module whose full name matches one of the globs."""
    return sorted(
        name for name, m in model.named_modules()
        if isinstance(m, SUPPORTED) and any(fnmatch.fnmatchcase(name, g) for g in globs)
    )


NAMES = [n for n, _ in make_model().named_modules() if n]
GLOB_PARTS = st.sampled_from(["*", "layers", "0", "1", "2", "q_proj", "v_proj", "head", "embed",
                              "layers.*", "*_proj", "?"])


@given(st.lists(st.lists(GLOB_PARTS, min_size=1, max_size=3).map(".".join), min_size=1,
                max_size=3))
def test_glob_selection_equals_brute_force(globs: list[str]) -> None:
    model = make_model()
    expected = brute_force(model, globs)
    matches_any = [g for g in globs if any(fnmatch.fnmatchcase(n, g) for n in NAMES)]
    if len(matches_any) < len(globs):
        with pytest.raises(lp.TargetError, match="matches no module"):
            lp.find_targets(model, globs)
    elif not expected:
        with pytest.raises(lp.TargetError, match="none of a supported type"):
            lp.find_targets(model, globs)
    else:
        assert lp.find_targets(model, globs) == expected


def test_every_target_form() -> None:
    model = make_model()
    assert lp.find_targets(model, "*.q_proj") == ["layers.0.q_proj", "layers.1.q_proj",
                                                  "layers.2.q_proj"]
    assert lp.find_targets(model, re.compile(r"layers\.[01]\.v_proj")) == [
        "layers.0.v_proj", "layers.1.v_proj"]
    assert lp.find_targets(model, nn.Embedding) == ["embed"]
    assert lp.find_targets(model, lambda name, m: name.endswith("head")) == ["head"]
    assert lp.find_targets(model, ["head", nn.Embedding]) == ["embed", "head"]
    assert lp.find_targets(model, nn.Linear, exclude=["layers.*"]) == ["head"]
    assert lp.find_targets(model, nn.Linear, exclude=re.compile(r".*proj")) == ["head"]


def test_regex_is_a_full_match() -> None:
    with pytest.raises(lp.TargetError, match=r"re.compile\('q_proj'\) matches no module"):
        lp.find_targets(make_model(), re.compile("q_proj"))


def test_typo_names_pattern_and_suggests_close_names() -> None:
    with pytest.raises(lp.TargetError, match=r"'\*\.q_prj' matches no module.*'\*\.q_proj'"):
        lp.inject_lora(make_model(), target=["*.q_prj"], rank=2)
    with pytest.raises(lp.TargetError, match=r"'haed' matches no module.*'head'"):
        lp.find_targets(make_model(), "haed")


def test_exclude_typo_is_an_error_too() -> None:
    with pytest.raises(lp.TargetError, match=r"exclude pattern 'hed' matches no module"):
        lp.find_targets(make_model(), nn.Linear, exclude="hed")


def test_type_matching_nothing_lists_types_present() -> None:
    with pytest.raises(lp.TargetError, match=r"nn.Conv2d matches no module.*nn.LayerNorm"):
        lp.find_targets(make_model(), nn.Conv2d)


def test_only_unsupported_types_lists_them() -> None:
    with pytest.raises(lp.TargetError, match=r"none of a supported type.*nn.LayerNorm.*"
                                              r"Supported: .*nn.Linear"):
        lp.inject_lora(make_model(), target="*.norm", rank=2)


def test_unsupported_matches_are_skipped_and_reported() -> None:
    model = make_model()
    with pytest.warns(lp.LoRAWarning, match=r"skipped .* layers.0.norm \(nn.LayerNorm\)"):
        names = lp.inject_lora(model, target="layers.0.*", rank=2)
    assert names == ["layers.0.q_proj", "layers.0.v_proj"]


def test_malformed_target_specs() -> None:
    with pytest.raises(lp.TargetError, match="target is empty"):
        lp.find_targets(make_model(), [])
    with pytest.raises(lp.TargetError, match="expected a glob string"):
        lp.find_targets(make_model(), 3)  # type: ignore[arg-type]
    with pytest.raises(lp.TargetError, match=r"is not an nn\.Module subclass"):
        lp.find_targets(make_model(), int)
    with pytest.raises(lp.TargetError, match="is not a glob string, regex"):
        lp.find_targets(make_model(), [1.5])  # type: ignore[list-item]


def test_root_module_cannot_be_replaced_in_place() -> None:
    with pytest.raises(lp.TargetError, match=r"the model itself .*nn.Sequential\(model\)"):
        lp.inject_lora(nn.Linear(3, 3), target=nn.Linear, rank=1)


def test_lora_internals_are_never_candidates() -> None:
    model = make_model()
    lp.inject_lora(model, target="head", rank=2)
    assert "head.lora_dropout.default" not in lp.find_targets(model, "*")
    assert lp.find_targets(model, "head*") == ["head"]


def test_compiled_model_names_drop_orig_mod_prefix() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    wrapper = nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert lp.find_targets(wrapper, "0") == ["0"]
    assert lp.inject_lora(wrapper, target="0", rank=2) == ["0"]
    assert isinstance(model[0], lp.LoRALinear)


def test_shared_module_is_selected_once_by_any_of_its_paths() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert lp.find_targets(model, "2") == ["2"]
    assert lp.find_targets(model, nn.Linear) == ["0"]


def test_exclude_is_checked_against_every_module() -> None:
    model = make_model()
    # 'layers.*' matches modules outside the target: not a typo, so no error.
    assert lp.find_targets(model, "head", exclude="layers.*") == ["head"]


def test_find_targets_selects_a_layer_its_owner_reads() -> None:
    # nn.MultiheadAttention reads out_proj.weight: it is handed W + ΔW (test_owner_reads).
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    assert lp.find_targets(model, nn.Linear) == ["attn.out_proj"]
