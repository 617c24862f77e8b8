"""nn.MultiheadAttention: every form of it against the dense float64 reference in reference.py."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, attention_dense, delta
from strategies import AttentionCase, attention_cases, randomize_adapters
from torch import nn

import loraplug as lp


@contextlib.contextmanager
def composite_path():
    """torch's composite attention path (its fused inference kernel rounds differently)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def deltas(attention: nn.Module, names: tuple[str, ...] = ("default",)) -> dict:
    """ΔW per part, from the raw adapter tensors of a LoRAMultiheadAttention."""
    found: dict = {}
    layers = {"in_proj": attention, **{p: attention._modules.get(p) for p in ("q", "k", "v",
                                                                          "out_proj")}}
    for key, layer in layers.items():
        if not isinstance(layer, lp.LoRALayer):
            continue
        for n in names:
            if n in layer.adapter_names:
                d = delta("linear", layer.lora_A[n], layer.lora_B[n], layer.scaling[n])
                found[key] = found.get(key, 0) + d
    return found


def _double(kwargs: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kwargs.items()}


def reference(case: AttentionCase, base: nn.MultiheadAttention, names=("default",), **extra):
    return attention_dense(base, deltas(case.model[0], names), *case.args,
                           **_double(case.kwargs), **extra)


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def _check(out: tuple, ref: tuple, dtype: torch.dtype) -> None:
    assert out[0].dtype == dtype
    assert_close(out[0], ref[0], dtype, scale=_scale(ref[0]))
    assert (out[1] is None) == (ref[1] is None)
    if out[1] is not None:
        assert_close(out[1], ref[1], dtype)


def _inject(case: AttentionCase, **kwargs: object) -> list[str]:
    return lp.inject_lora(case.model, target=case.targets, rank=case.rank, alpha=case.alpha,
                          **kwargs)


@given(attention_cases(torch.float32), st.sampled_from(["eval", "train"]))
def test_fresh_adapters_change_nothing_bit_for_bit(case: AttentionCase, mode: str) -> None:
    # Against the attention before injection (trainable). For a strided input torch picks
    # its float64 kernels by whether the weight requires grad, and they round differently:
    # float32 is the case that holds bit for bit.
    getattr(case.model, mode)()
    with composite_path():
        expected = case.base(*case.args, **case.kwargs)
    _inject(case)
    out = case.model[0](*case.args, **case.kwargs)
    assert torch.equal(out[0], expected[0])
    assert (out[1] is None and expected[1] is None) or torch.equal(out[1], expected[1])


@given(attention_cases(), st.sampled_from(["eval", "train"]))
def test_unmerged_and_merged_match_the_dense_reference(case: AttentionCase, mode: str) -> None:
    base = copy.deepcopy(case.base)
    _inject(case)
    randomize_adapters(case.model)
    getattr(case.model, mode)()
    ref = reference(case, base)
    dtype = base.in_proj_bias.dtype if base.in_proj_bias is not None else base.out_proj.weight.dtype
    _check(case.model[0](*case.args, **case.kwargs), ref, dtype)
    lp.merge(case.model)
    _check(case.model[0](*case.args, **case.kwargs), ref, dtype)
    # Merged, the layer is torch's own attention (fast path included) on the merged weights.
    plain = copy.deepcopy(base).requires_grad_(False)
    plain.load_state_dict({k[2:]: v for k, v in case.model.state_dict().items()
                           if "lora_" not in k})
    with torch.no_grad():
        assert torch.equal(case.model[0](*case.args, **case.kwargs)[0],
                           plain(*case.args, **case.kwargs)[0])


@given(attention_cases(torch.float64))
def test_save_merged_gives_the_plain_attention_the_adapted_function(case: AttentionCase) -> None:
    # Adapters on in_proj and on q, k, v write rows of one tensor: every one is in the file,
    # under the attention's own keys, and nothing else is.
    import tempfile

    from safetensors.torch import load_file

    base = copy.deepcopy(case.base)
    _inject(case)
    randomize_adapters(case.model)
    case.model.eval()
    ref = reference(case, base)
    with tempfile.TemporaryDirectory() as tmp:
        lp.save_merged(case.model, f"{tmp}/merged.safetensors")
        state = load_file(f"{tmp}/merged.safetensors")
    plain = nn.Sequential(copy.deepcopy(base)).eval()
    assert sorted(state) == sorted(plain.state_dict())
    plain.load_state_dict(state)
    _check(plain[0](*case.args, **case.kwargs), ref, torch.float64)


@given(attention_cases(torch.float64))
def test_unmerge_and_unload_restore_the_attention(case: AttentionCase) -> None:
    original = case.base
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    _inject(case)
    randomize_adapters(case.model)
    lp.merge(case.model)
    lp.unmerge(case.model)
    for k, v in state.items():
        assert_close(case.model.state_dict()[k], v)
    lp.unload(case.model)
    assert case.model[0] is original and not hasattr(original, "q")
    assert original.out_proj.__class__ is nn.modules.linear.NonDynamicallyQuantizableLinear


@given(attention_cases(torch.float64))
def test_unload_without_merging_is_bit_for_bit(case: AttentionCase) -> None:
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    _inject(case)
    randomize_adapters(case.model)
    case.model[0](*case.args, **case.kwargs)
    lp.unload(case.model)
    after = case.model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


@given(attention_cases(torch.float64))
def test_only_the_adapters_get_gradients(case: AttentionCase) -> None:
    _inject(case)
    randomize_adapters(case.model)
    case.model.train()
    out, _ = case.model[0](*case.args, **case.kwargs)
    out.sum().backward()
    for name, p in case.model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name


@given(attention_cases(torch.float64))
def test_attention_dropout_in_training_is_torchs(case: AttentionCase) -> None:
    case.base.dropout = 0.5
    base = copy.deepcopy(case.base)
    _inject(case)
    randomize_adapters(case.model)
    case.model.train()
    torch.manual_seed(3)
    out = case.model[0](*case.args, **case.kwargs)
    torch.manual_seed(3)
    ref = reference(case, base, training=True)
    _check(out, ref, torch.float64)


@given(attention_cases(torch.float32))
def test_branch_dropout_touches_only_the_branch(case: AttentionCase) -> None:
    with composite_path():
        expected = case.base(*case.args, **case.kwargs)
    _inject(case, dropout=0.5)
    case.model.train()
    out = case.model[0](*case.args, **case.kwargs)  # B = 0: whatever is dropped adds nothing
    assert torch.equal(out[0], expected[0])


@given(attention_cases(torch.float64), st.integers(0, 2**16))
def test_two_adapters_add_up_and_merge(case: AttentionCase, seed: int) -> None:
    base = copy.deepcopy(case.base)
    _inject(case)
    _inject(case, name="b")
    randomize_adapters(case.model, seed)
    lp.set_adapter(case.model, ["default", "b"])
    ref = reference(case, base, names=("default", "b"))
    _check(case.model[0](*case.args, **case.kwargs), ref, torch.float64)
    lp.merge(case.model)
    _check(case.model[0](*case.args, **case.kwargs), ref, torch.float64)
    lp.unmerge(case.model)
    with lp.disable_adapters(case.model), composite_path():
        _check(case.model[0](*case.args, **case.kwargs),
               attention_dense(base, {}, *case.args, **_double(case.kwargs)), torch.float64)


@given(attention_cases(torch.float64))
def test_adapter_per_sample_routes_each_row(case: AttentionCase) -> None:
    query = case.args[0]
    batch_dim = 0 if case.base.batch_first else 1
    rows = query.shape[batch_dim] if query.dim() == 3 else 1  # unbatched: a batch of one
    base = copy.deepcopy(case.base)
    _inject(case, name="a")
    _inject(case, name="b")
    randomize_adapters(case.model)
    names = (["a", "b", None] * rows)[:rows]
    with lp.adapter_per_sample(case.model, names):
        out, _ = case.model[0](*case.args, **case.kwargs)
    for i, name in enumerate(names):
        ref, _ = reference(case, base, names=(name,) if name else ())
        if query.dim() == 3:
            got, want = out.select(batch_dim, i), ref.select(batch_dim, i)
        else:
            got, want = out, ref
        assert_close(got, want, torch.float64, scale=_scale(ref))


# --------------------------------------------------------------------------- targeting
def _mha(**kwargs: object) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True, **kwargs), nn.Linear(8, 3))


@pytest.mark.parametrize(("target", "exclude", "names"), [
    ("0", None, ["0", "0.out_proj"]),
    (nn.MultiheadAttention, None, ["0", "0.out_proj"]),
    (["0.q", "0.v"], None, ["0.q", "0.v"]),
    ("0.*", None, ["0.k", "0.out_proj", "0.q", "0.v"]),
    ("0", "*.out_proj", ["0"]),
    (nn.Linear, None, ["0.out_proj", "1"]),
    (["0", "0.q"], None, ["0", "0.out_proj", "0.q"]),
])
def test_targets_name_the_parts(target, exclude, names) -> None:
    model = _mha()
    assert lp.find_targets(model, target, exclude=exclude) == names
    assert lp.inject_lora(model, target=target, exclude=exclude, rank=2) == names
    assert sorted(n for n, m in model.named_modules() if isinstance(m, lp.LoRALayer)
                  and m.adapter_names) == [n for n in names if n != "1"] + \
        (["1"] if "1" in names else [])


def test_separate_qkv_weights_adapt_the_parts() -> None:
    model = _mha(kdim=5, vdim=3)
    assert lp.inject_lora(model, target="0", rank=2) == ["0.k", "0.out_proj", "0.q", "0.v"]
    assert model[0].k.lora_A["default"].shape == (2, 5)
    assert not model[0].adapter_names


def test_a_second_adapter_reaches_existing_parts() -> None:
    model = _mha()
    lp.inject_lora(model, target=["0.q", "0.v"], rank=2)
    q = model[0].q
    assert lp.inject_lora(model, target=["0.q", "0.k"], rank=2, name="b") == ["0.k", "0.q"]
    assert model[0].q is q and q.adapter_names == ("default", "b")
    assert model[0].k.adapter_names == ("b",)


def test_an_attention_subclass_with_its_own_forward_is_refused() -> None:
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return super().forward(*args, **kwargs)

    model = nn.Sequential(Custom(8, 2))
    for target in ("0", "0.q"):
        with pytest.raises(lp.ConfigError, match=r"Custom overrides nn\.MultiheadAttention"):
            lp.inject_lora(model, target=target, rank=2)
    assert type(model[0]) is Custom


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_input_needs_self_attention_without_masks() -> None:
    model = _mha()
    lp.inject_lora(model, target="0", rank=2)
    randomize_adapters(model)
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with pytest.raises(RuntimeError, match="needs self-attention"):
        model[0](nested, nested.clone(), nested.clone(), need_weights=False)


def test_is_causal_without_a_mask_is_refused_as_torch_refuses_it() -> None:
    model = _mha()
    lp.inject_lora(model, target="0", rank=2)
    x = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        model[0](x, x, x, is_causal=True, need_weights=False)


@pytest.mark.parametrize(("mask", "message"), [
    (torch.zeros(3, 4), r"2D attn_mask has shape \(3, 4\); expected \(4, 4\)"),
    (torch.zeros(3, 4, 4), r"3D attn_mask has shape \(3, 4, 4\); expected \(4, 4, 4\)"),
])
def test_attention_masks_of_the_wrong_shape_are_refused(mask, message) -> None:
    model = _mha()
    lp.inject_lora(model, target="0", rank=2)
    x = torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match=message):
        model[0](x, x, x, attn_mask=mask)


def test_own_in_proj_adapter_on_separate_weights_is_refused() -> None:
    layer = lp.LoRAMultiheadAttention(nn.MultiheadAttention(8, 2, kdim=3), nn.MultiheadAttention)
    assert "no packed in_proj adapter" in layer.check_rank(2)


def test_a_key_padding_mask_of_the_wrong_shape_is_refused() -> None:
    model = _mha()
    lp.inject_lora(model, target="0", rank=2)
    x = torch.randn(2, 4, 8)
    with pytest.raises(AssertionError, match=r"key_padding_mask of shape \(2, 4\), received "
                                             r"\(4, 2\)"):
        model[0](x, x, x, key_padding_mask=torch.zeros(4, 2, dtype=torch.bool))


def test_attention_compiles_with_fullgraph_and_switches_without_recompiling() -> None:
    from test_compile import CountingBackend

    model = _mha()
    base = copy.deepcopy(model[0])
    lp.inject_lora(model, target=["0", "0.q", "0.v"], rank=2)
    lp.inject_lora(model, target=["0", "0.q", "0.v"], rank=2, name="other")
    randomize_adapters(model)
    backend = CountingBackend()
    compiled = torch.compile(model[0], backend=backend, fullgraph=True)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        for live in (["default"], ["other"], ["default", "other"]):
            lp.set_adapter(model, live)
            ref = attention_dense(base, deltas(model[0], tuple(live)), x, x, x,
                                  need_weights=False)
            assert_close(compiled(x, x, x, need_weights=False)[0], ref[0], torch.float32)
    assert backend.graphs == 1
    compiled(x, x, x, need_weights=False)[0].sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
