"""The code in docs/extending.md runs as written, and its layer type is checked further.

The page registers a layer type for a stand-in of GPT-2's ``Conv1D`` (weight stored
``(in, out)``, ``y = x @ W + b``); here it is held against a float64 dense reference on
random shapes, merged against unmerged, and its merge refusal is checked at every entry
point.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loraplug as lp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def page() -> dict[str, object]:
    """The page's namespace after running its python blocks in order, as a reader would."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 4
    first = blocks[0].strip().splitlines()
    assert len(first) <= 40, "the worked example stays short"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def _dense(layer: lp.LoRALayer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    # x @ (W + Σ s·(B A)ᵀ) + b in float64, from the raw tensors.
    weight = layer.weight.double()
    for n in names:
        weight = weight + layer.scaling[n] * (layer.lora_B[n].double()
                                              @ layer.lora_A[n].double()).t()
    return x.double() @ weight + layer.bias.double()


@settings(max_examples=20, deadline=None)
@given(n_in=st.integers(1, 9), n_out=st.integers(1, 9), rank=st.integers(1, 4),
       alphas=st.lists(st.floats(0.5, 8.0), min_size=1, max_size=2), train=st.booleans())
def test_the_page_layer_matches_the_dense_reference(
        page: dict[str, object], n_in: int, n_out: int, rank: int, alphas: list[float],
        train: bool) -> None:
    conv1d = page["Conv1D"]
    rank = min(rank, n_in, n_out)  # a larger rank only warns (LoRAWarning)
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(n_in, n_out)).double()  # type: ignore[operator]
    names = [f"a{i}" for i in range(len(alphas))]
    for name, alpha in zip(names, alphas):
        lp.inject_lora(model, target=conv1d, rank=rank, alpha=alpha, name=name)  # type: ignore[arg-type]
    lp.set_adapter(model, names)
    layer = model[0]
    assert isinstance(layer, page["LoRAConv1D"])  # type: ignore[arg-type]
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    model.train(train)
    x = torch.randn(3, 2, n_in, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(y, _dense(layer, x, names))
    weight = layer.weight.detach().clone()
    lp.merge(model, safe=True)
    with torch.no_grad():  # a merged layer in a training forward warns (it cannot train)
        torch.testing.assert_close(model(x), y)
    for name in names:
        torch.testing.assert_close(layer.delta_weight(name),
                                   layer.scaling[name] * (layer.lora_B[name]
                                                          @ layer.lora_A[name]).t().detach())
    lp.unmerge(model)
    torch.testing.assert_close(layer.weight, weight)
    (y.sum()).backward()
    assert all(p.grad is not None for p in layer.lora_A.values())


def test_merge_refusal_is_honoured_everywhere(page: dict[str, object], tmp_path: Path) -> None:
    model = nn.Sequential(page["ReadOnlyConv1D"](4, 3))  # type: ignore[operator]
    lp.inject_lora(model, target=page["ReadOnlyConv1D"], rank=2)  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reason = r"cannot be merged: its weight is shared read-only memory"
    for action, call in (
        ("merge", lp.merge),
        ("merge", lambda m: lp.merge(m, safe=True)),
        (r"unload\(merge=True\)", lambda m: lp.unload(m, merge=True)),
        ("save_merged", lambda m: lp.save_merged(m, tmp_path / "merged.safetensors")),
    ):
        with pytest.raises(lp.StateError, match=rf"{action}: layers \['0'\] {reason}"):
            call(model)
    with pytest.raises(lp.StateError, match=rf"a LoRAReadOnlyConv1D {reason}"):
        model[0].merge()
    assert not model[0].merged and not (tmp_path / "merged.safetensors").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
