"""Merging by name against PEFT's merge_adapter / unmerge_adapter on the same adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_combine_peft import pair
from test_peft_interop import TARGETS, inputs, relative_error

import loraplug as lp

peft = pytest.importorskip("peft")


def outputs(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(*inputs())


def test_merges_by_name_compute_what_peft_does_and_unmerge_exactly(tmp_path: Path) -> None:
    theirs, ours = pair(tmp_path)
    weights = {p: ours.get_submodule(p).weight.clone() for p in TARGETS}
    for step in (["style"], ["subj"]):
        theirs.merge_adapter(step)
        lp.merge(ours, step)
        assert relative_error(outputs(ours), outputs(theirs)) <= 1e-6
    assert ours.fc1.merged_adapters == ("style", "subj")
    theirs.unmerge_adapter()
    lp.unmerge(ours)
    assert relative_error(outputs(ours), outputs(theirs)) <= 1e-6
    theirs_weights = {p: theirs.base_model.model.get_submodule(p).weight for p in TARGETS}
    # PEFT's round trip moves some of W's entries by a rounding; ours gives W back.
    assert any(not torch.equal(theirs_weights[p], weights[p]) for p in TARGETS)
    assert all(torch.equal(ours.get_submodule(p).weight, weights[p]) for p in TARGETS)


def test_disable_on_a_merged_model_gives_the_base_as_peft_does(tmp_path: Path) -> None:
    theirs, ours = pair(tmp_path)
    theirs.merge_adapter(["style"])
    lp.merge(ours, "style")
    with theirs.disable_adapter(), lp.disable_adapters(ours):
        assert relative_error(outputs(ours), outputs(theirs)) <= 1e-6
    # PEFT's forward unmerged the model for good; ours is merged again.
    assert not theirs.base_model.model.fc1.merged and ours.fc1.merged_adapters == ("style",)
