"""combine_adapters against PEFT's add_weighted_adapter, the oracle, on the same adapters.

Two PEFT adapters with random A and B (different alphas, so different scalings) are
saved and loaded into loraplug; both libraries then combine them. The entry-by-entry
methods (linear, ties, dare_*, magnitude_prune) give bit-identical A and B, DARE
included: its masks come from the same generator state, drawn in the same order. The
SVD methods agree to float32 rounding (ΔW within 1e-5 relative): their ΔW_i are
computed by different kernels before the SVD.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from test_peft_interop import TARGETS, inputs, net, relative_error

import loraplug as lp
from loraplug._combine import METHODS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

WEIGHTS = {"style": 0.7, "subj": -0.4}
SVD_METHODS = [m for m, (_, _, svd) in METHODS.items() if svd]


def pair(tmp_path: Path, use_rslora: bool = False, **second: object):  # type: ignore[no-untyped-def]
    """(PEFT model, loraplug model) carrying the same adapters 'style' and 'subj'."""
    base = net()
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                  use_rslora=use_rslora)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config),
                                 adapter_name="style")
    theirs.add_adapter("subj", peft.LoraConfig(**{**config, "lora_alpha": 3, **second}))
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if key.endswith((".subj.weight", ".subj")):
                p.normal_()
    theirs.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    for name in ("style", "subj"):
        lp.load_adapter(ours, tmp_path / name, name=name)
    return theirs.eval(), ours


def peft_tensors(model, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    layer = model.base_model.model.get_submodule(path)
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()


def combine_both(theirs, ours, method: str, weights=WEIGHTS, **options):  # type: ignore[no-untyped-def]
    """Run both libraries; DARE's masks from the same generator state."""
    peft_options = {"svd_rank" if k == "rank" else "majority_sign_method" if
                    k == "majority_sign" else k: v for k, v in options.items()}
    # PEFT initialises the new adapter (drawing from the global generator) before its
    # masks: find the generator state its masks start from with a method without masks.
    generator = None
    if method.startswith("dare"):
        probe = copy.deepcopy(theirs)
        torch.manual_seed(5)
        probe.add_weighted_adapter(list(weights), list(weights.values()), "probe",
                                   combination_type="linear")
        generator = torch.Generator().set_state(torch.get_rng_state())
    torch.manual_seed(5)
    theirs.add_weighted_adapter(list(weights), list(weights.values()), "mix",
                                combination_type=method, **peft_options)
    lp.combine_adapters(ours, weights, "mix", method=method, generator=generator, **options)


def assert_same_deltas(theirs, ours, exact: bool, bound: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    for path in TARGETS:
        a, b = peft_tensors(theirs, path, "mix")
        layer = ours.get_submodule(path)
        if exact:
            assert torch.equal(layer.lora_A["mix"], a) and torch.equal(layer.lora_B["mix"], b)
        theirs_delta = theirs.base_model.model.get_submodule(path).get_delta_weight("mix")
        ours_delta, theirs_delta = layer.delta_weight("mix"), theirs_delta.detach()
        error = (ours_delta - theirs_delta).abs().max()
        assert error <= bound * theirs_delta.abs().max(), path  # 0 <= 0 when all pruned
        assert layer.scaling["mix"] == 1.0


def assert_same_outputs(theirs, ours, bound: float) -> None:  # type: ignore[no-untyped-def]
    theirs.set_adapter("mix")
    lp.set_adapter(ours, "mix")
    with torch.no_grad():
        ours_y, theirs_y = ours(*inputs()), theirs(*inputs())
    assert relative_error(ours_y, theirs_y) <= bound


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_peft_numbers(tmp_path: Path, method: str) -> None:
    theirs, ours = pair(tmp_path)
    prune = METHODS[method][0]
    combine_both(theirs, ours, method, **({"density": 0.5} if prune else {}))
    svd = method in SVD_METHODS
    assert_same_deltas(theirs, ours, exact=not svd)
    assert_same_outputs(theirs, ours, 1e-5 if svd else 1e-6)


@pytest.mark.parametrize(("method", "options"), [
    ("ties", {"density": 0.3, "majority_sign": "frequency"}),
    ("dare_ties", {"density": 0.8, "majority_sign": "frequency"}),
    ("magnitude_prune", {"density": 0.0}),
    ("dare_linear", {"density": 1.0}),
    ("svd", {"rank": 2}),
    ("svd", {"rank": 2, "svd_clamp": 0.9}),
    ("ties_svd", {"density": 0.6, "rank": 3, "svd_clamp": 0.5}),
    ("svd", {"svd_full_matrices": False}),
])
def test_options_give_peft_numbers(tmp_path: Path, method: str, options: dict) -> None:
    theirs, ours = pair(tmp_path)
    combine_both(theirs, ours, method, **options)
    # Clipping at a quantile of the factors moves with their rounding: a looser bound.
    bound = 1e-4 if "svd_clamp" in options else 1e-5
    assert_same_deltas(theirs, ours, exact=method not in SVD_METHODS, bound=bound)


def test_one_adapter_is_scaled_by_its_weight_as_in_peft(tmp_path: Path) -> None:
    theirs, ours = pair(tmp_path)
    combine_both(theirs, ours, "svd", weights={"subj": -1.5})
    assert_same_deltas(theirs, ours, exact=True)
    for path in TARGETS:
        layer = ours.get_submodule(path)
        torch.testing.assert_close(layer.delta_weight("mix"), -1.5 * layer.delta_weight("subj"))


def test_cat_of_different_ranks_has_peft_numbers_without_its_zero_padding(
        tmp_path: Path) -> None:
    # PEFT's cat is padded with zero rows up to the sum of the configs' ranks (here
    # 4 + 4 on fc2 too); loraplug's rank on each layer is the sum of the ranks there.
    theirs, ours = pair(tmp_path, rank_pattern={"fc2": 2})
    combine_both(theirs, ours, "cat")
    assert_same_deltas(theirs, ours, exact=False, bound=1e-6)
    a, b = peft_tensors(theirs, "fc2", "mix")
    assert a.shape[0] == 8 and ours.fc2.rank["mix"] == 6
    assert torch.equal(ours.fc2.lora_A["mix"], a[:6]) and not a[6:].any()
    assert torch.equal(ours.fc2.lora_B["mix"], b[:, :6])


def test_rslora_adapters_combine_with_scaling_one_unlike_peft(tmp_path: Path) -> None:
    # PEFT gives the new adapter the first one's use_rslora, so its scaling is
    # r / sqrt(r) = sqrt(r) instead of 1: its ΔW is sqrt(r) times the sum. Same A and B.
    theirs, ours = pair(tmp_path, use_rslora=True)
    combine_both(theirs, ours, "cat")
    for path in TARGETS:
        a, b = peft_tensors(theirs, path, "mix")
        layer = ours.get_submodule(path)
        assert torch.equal(layer.lora_A["mix"], a) and torch.equal(layer.lora_B["mix"], b)
        assert theirs.base_model.model.get_submodule(path).scaling["mix"] == pytest.approx(8 ** 0.5)
        exact = 0.7 * layer.delta_weight("style") - 0.4 * layer.delta_weight("subj")
        torch.testing.assert_close(layer.delta_weight("mix"), exact, rtol=1e-5, atol=1e-6)


def test_combined_adapter_saves_and_loads_in_peft(tmp_path: Path) -> None:
    _, ours = pair(tmp_path)
    lp.combine_adapters(ours, WEIGHTS, "mix", method="cat")
    lp.save_adapter(ours, tmp_path / "mix", name="mix")
    again = peft.PeftModel.from_pretrained(net(), str(tmp_path / "mix")).eval()
    lp.set_adapter(ours, "mix")
    with torch.no_grad():
        assert relative_error(ours(*inputs()), again(*inputs())) <= 1e-6


def test_hyphenated_names_as_in_peft(tmp_path: Path) -> None:
    theirs, _ = pair(tmp_path)
    theirs.add_adapter("adapter-2", peft.LoraConfig(r=4, target_modules=TARGETS,
                                                    init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = net()
    lp.load_adapter(ours, tmp_path / "adapter-2", name="adapter-2")
    lp.set_adapter(ours, "adapter-2")
    theirs.set_adapter("adapter-2")
    with torch.no_grad():
        assert relative_error(ours(*inputs()), theirs(*inputs())) <= 1e-6
    assert "fc1.lora_A.adapter-2" in ours.state_dict()
