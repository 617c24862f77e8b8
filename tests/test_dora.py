"""DoRA against a dense float64 reference: W' = m ⊙ V / ‖V‖, V = W + s·ΔW, per channel."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, delta, dense_forward
from strategies import Case, conv_cases, embedding_cases, linear_cases
from torch import Tensor, nn

import loraplug as lp


def cases(dtype: torch.dtype | None = None) -> st.SearchStrategy[Case]:
    return st.one_of(linear_cases(dtype), conv_cases(dtype=dtype), embedding_cases(dtype))


def reference_weight(case: Case, weight: Tensor, a: Tensor, b: Tensor, m: Tensor,
                     scaling: float) -> Tensor:
    """m ⊙ V / ‖V‖ in float64; channels are rows (columns for an embedding's W)."""
    v = weight.double() + delta(case.kind, a, b, scaling, case.groups)
    if case.kind == "embedding":
        return m.double().reshape(1, -1) * v / v.norm(dim=0, keepdim=True)
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    return m.double().reshape(norm.shape) * v / norm


def train_a_little(model: nn.Module, seed: int = 0) -> None:
    """Move A, B and the magnitude off their start, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".lora_" in key:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                scale = 0.1 * p.detach().abs().mean().clamp_min(0.1)
                p.add_(noise * scale if "magnitude" in key else noise * 0.5)


def adapted(case: Case, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    base = copy.deepcopy(case.model)
    lp.inject_lora(case.model, target="0", rank=case.rank, alpha=case.alpha, dora=True,
                   **kwargs)
    return base.eval(), case.model.eval()


@given(case=cases(torch.float64))
def test_fresh_dora_adapter_changes_nothing(case: Case) -> None:
    base, model = adapted(case)
    assert_close(model(case.x), base(case.x))
    layer = model[0]
    m = layer.lora_magnitude_vector["default"]
    assert m.requires_grad and m.dtype == layer.weight.dtype


@given(case=cases(torch.float64), rslora=st.booleans())
def test_forward_merged_and_unmerged_equal_the_reference(case: Case, rslora: bool) -> None:
    base, model = adapted(case, use_rslora=rslora)
    train_a_little(model)
    layer = model[0]
    weight = layer.weight.detach().clone()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    m = layer.lora_magnitude_vector["default"]
    expected = dense_forward(base[0], reference_weight(case, weight, a, b, m,
                                                       layer.scaling["default"]), case.x)
    assert_close(model(case.x), expected)
    model.train()
    assert_close(model(case.x), expected)  # no dropout: training computes the same
    model.eval()
    lp.merge(model)
    assert_close(layer.weight, reference_weight(case, weight, a, b, m, layer.scaling["default"]))
    assert_close(model(case.x), expected)
    lp.unmerge(model)
    assert_close(layer.weight, weight)
    assert_close(model(case.x), expected)


@given(case=cases(torch.float64))
def test_gradients_treat_the_norm_as_a_constant(case: Case) -> None:
    if case.kind == "embedding":
        # Per-row gradient rules (padding_idx, scale_grad_by_freq, max_norm) act on the
        # lookup; DoRA's magnitude multiplies the looked-up rows afterwards, as in PEFT.
        emb = case.base
        emb.padding_idx, emb.max_norm, emb.scale_grad_by_freq = None, None, False
    base, model = adapted(case)
    train_a_little(model)
    layer = model[0]
    params = [layer.lora_A["default"], layer.lora_B["default"],
              layer.lora_magnitude_vector["default"]]
    weight = layer.weight.detach().clone()
    out = model(case.x)
    grads = torch.autograd.grad(out.square().sum(), params)
    # The reference: m ⊙ V / stop_gradient(‖V‖), differentiated by autograd.
    a, b, m = (p.detach().clone().requires_grad_(True) for p in params)
    v = weight + delta(case.kind, a, b, layer.scaling["default"], case.groups)
    dims = 0 if case.kind == "embedding" else tuple(range(1, v.dim()))
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True).detach()
    shaped = m.reshape(1, -1) if case.kind == "embedding" else m.reshape(norm.shape)
    ref = dense_forward(base[0], shaped * v / norm, case.x)
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (a, b, m))):
        assert_close(got, want)


@given(case=cases(torch.float64))
def test_unmerge_after_a_restart_restores_the_weight(case: Case) -> None:
    """A merged model saved whole and loaded in a new process unmerges: the norms it
    divided by are tensors of the model (``lora_dora_norm``), not a cache."""
    _, model = adapted(case)
    train_a_little(model)
    original = model[0].weight.detach().clone()
    lp.merge(model)
    assert torch.equal(model[0].lora_dora_norm["default"],
                       model[0].state_dict()["lora_dora_norm.default"])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restarted = torch.load(buffer, weights_only=False)
    lp.unmerge(restarted)
    assert_close(restarted[0].weight, original)


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_dora_file_round_trip(kind: str, tmp_path: Path) -> None:
    layer = {"linear": nn.Linear(6, 5), "conv": nn.Conv2d(4, 6, 3, groups=2),
             "embedding": nn.Embedding(9, 4)}[kind]
    x = {"linear": torch.randn(3, 6), "conv": torch.randn(2, 4, 5, 5),
         "embedding": torch.randint(0, 9, (3, 4))}[kind]
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    base = copy.deepcopy(model)
    lp.inject_lora(model, target="0", rank=2, dora=True)
    train_a_little(model)
    lp.save_adapter(model, tmp_path)
    lp.load_adapter(base, tmp_path)
    assert torch.equal(base(x), model(x))
    shape = model[0].lora_magnitude_vector["default"].shape
    assert shape == {"linear": (5,), "conv": (1, 6, 1, 1), "embedding": (4,)}[kind]


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_mixed_dora_and_plain_adapters_in_one_batch(kind: str) -> None:
    torch.manual_seed(0)
    layer = {"linear": nn.Linear(6, 5), "conv": nn.Conv2d(4, 6, 3, padding=1),
             "embedding": nn.Embedding(9, 4)}[kind]
    x = {"linear": torch.randn(4, 3, 6), "conv": torch.randn(4, 4, 5, 5),
         "embedding": torch.randint(0, 9, (4, 3))}[kind]
    model = nn.Sequential(layer)
    lp.inject_lora(model, target="0", rank=2, name="a", dora=True)
    lp.inject_lora(model, target="0", rank=2, name="b")
    lp.inject_lora(model, target="0", rank=4 if kind != "embedding" else 3, name="c", dora=True)
    if kind != "embedding":
        lp.inject_lora(model, target="0", rank=2, name="d", lora_bias=True)
    train_a_little(model)
    names = ["a", "b", None, "c"] if kind == "embedding" else ["a", "d", None, "c"]
    with lp.adapter_per_sample(model, names):
        mixed = model(x)
    for row, name in enumerate(names):
        if name is None:
            with lp.disable_adapters(model):
                alone = model(x[row:row + 1])
        else:
            lp.set_adapter(model, name)
            alone = model(x[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], alone)


@given(case=cases(torch.float64))
def test_save_reload_merge_unmerge_gives_the_weight_back(case: Case) -> None:
    import tempfile

    base, model = adapted(case)
    train_a_little(model)
    weight = base[0].weight.detach().clone()
    with tempfile.TemporaryDirectory() as tmp:
        lp.save_adapter(model, tmp)
        fresh = copy.deepcopy(base).eval()
        lp.load_adapter(fresh, tmp)
    assert_close(fresh(case.x), model(case.x))
    lp.merge(fresh)
    assert_close(fresh(case.x), model(case.x))
    lp.unmerge(fresh)
    assert_close(fresh[0].weight, weight)


class Plain(nn.Linear):
    """A Linear whose LoRA layer type declares no output channels."""


@lp.register_lora_layer(Plain)
class LoRAPlain(lp.LoRALinear):
    def channel_shape(self, channels: int) -> tuple[int, ...] | None:
        return None


def test_dora_on_a_layer_type_without_channels_is_refused() -> None:
    model = nn.Sequential(Plain(4, 3))
    with pytest.raises(lp.ConfigError, match=r"DoRA needs a per-output-channel magnitude, which "
                                             r"LoRAPlain does not declare"):
        lp.inject_lora(model, target="0", rank=2, dora=True)


def test_an_adapter_dora_on_some_layers_only_is_refused_on_save(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lp.inject_lora(model, target="0", rank=2, dora=True)
    lp.inject_lora(model, target="1", rank=2)  # the same adapter, plain on this layer
    with pytest.raises(lp.AdapterFileError, match=r"adapter 'default' has use_dora \{'True': "
                                                  r"\['0'\], 'False': \['1'\]\} on different "
                                                  r"layers"):
        lp.save_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())


@torch.no_grad()
def test_compiled_dora_switches_adapters_without_recompiling() -> None:
    from test_compile import CountingBackend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Unflatten(1, (6, 1)), nn.Conv1d(6, 4, 1))
    lp.inject_lora(model, target=["0", "3"], rank=2, dora=True)
    lp.inject_lora(model, target=["0", "3"], rank=2, name="plain")
    train_a_little(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(3, 6)
    for names in (["default"], ["plain"], ["default", "plain"]):
        lp.set_adapter(model, names)
        torch.testing.assert_close(compiled(x), model(x))
    with lp.disable_adapters(model):
        torch.testing.assert_close(compiled(x), model(x))
    assert backend.graphs == 1
