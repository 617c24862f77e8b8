"""torch.compile: compiled outputs equal the dense reference; adapter state changes reuse the graph.

Dynamo guards on every Python value a compiled function reads; a LoRA layer under
compilation reads its scalings and on/off gates from a tensor instead (``_compile.py``).
A counting backend counts the graphs dynamo hands to it: one graph per compilation.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file
from torch import nn

import loraplug as lp
from tests.reference import assert_close, delta, dense_forward


class CountingBackend:
    """A dynamo backend that runs graphs eagerly (or through ``inner``) and counts them."""

    def __init__(self, inner: str = "eager") -> None:
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """Embedding → Conv1d (reflect, dilated) → Linear → Linear: every layer type in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, T) -> (B, T, 4)
        h = self.emb(ids).transpose(1, 2)  # (B, 6, T)
        h = self.conv(h).transpose(1, 2)  # (B, T, 8)
        return self.head(torch.tanh(self.fc(h)))


TARGETS = ["emb", "conv", "fc", "head"]
KIND = {"emb": "embedding", "conv": "conv", "fc": "linear", "head": "linear"}
#: adapter name -> (rank, alpha); "a" and "b" share a rank, "c" does not.
ADAPTERS = {"a": (2, 4.0), "b": (2, 1.0), "c": (4, 2.0)}


def _randomize_adapters(model: nn.Module, seed: int) -> None:
    # Fresh adapters have B = 0 (A = 0 for embeddings); give every tensor values.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _net(adapters: dict[str, tuple[int, float]] = ADAPTERS) -> tuple[nn.Module, nn.Module]:
    """(base copy, model with ``adapters`` on every layer, "a" active)."""
    torch.manual_seed(0)
    model = Net()
    base = copy.deepcopy(model)
    for name, (rank, alpha) in adapters.items():
        lp.inject_lora(model, target=TARGETS, rank=rank, alpha=alpha, name=name)
    _randomize_adapters(model, seed=1)
    return base, model


def _reference(base: nn.Module, model: nn.Module, live: dict[str, float]) -> nn.Module:
    """``base`` with W + Σ s·ΔW over ``live`` (adapter -> alpha), from the raw tensors."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path in TARGETS:
            layer, target = model.get_submodule(path), ref.get_submodule(path)
            w = target.weight.double()
            for name, alpha in live.items():
                a, b = layer.lora_A[name], layer.lora_B[name]
                w = w + delta(KIND[path], a, b, alpha / a.shape[0])
            target.weight.copy_(w)
    return ref


def _ids() -> torch.Tensor:
    return torch.tensor([[0, 3, 5, 7, 11, 2], [4, 4, 0, 9, 1, 6]])


@torch.no_grad()
def test_inference_needs_no_recompilation_to_switch_load_disable_or_change_alpha(
    tmp_path: Path,
) -> None:
    base, model = _net()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = _ids()
    alphas = {name: alpha for name, (_, alpha) in ADAPTERS.items()}

    def check(live: list[str]) -> None:
        expected = _reference(base, model, {n: alphas[n] for n in live})(ids)
        assert_close(compiled(ids), expected)

    check(["a"])
    lp.set_adapter(model, "b")  # same rank
    check(["b"])
    lp.set_adapter(model, "c")  # another rank: every adapter is in the graph already
    check(["c"])
    lp.set_adapter(model, ["a", "c"])
    check(["a", "c"])
    _randomize_adapters(model, seed=2)  # new weights, written in place
    check(["a", "c"])
    for path in TARGETS:  # new weights as new Parameter objects, as a loader may do
        layer = model.get_submodule(path)
        layer.lora_A["a"] = nn.Parameter(layer.lora_A["a"].detach() * -1.5)
    check(["a", "c"])
    with lp.disable_adapters(model):
        assert_close(compiled(ids), base(ids))
    check(["a", "c"])
    alphas["c"] = 7.0
    for path in TARGETS:
        model.get_submodule(path).set_scale("c", 7.0)
    check(["a", "c"])
    _, donor = _net()  # an adapter file with other values for "b"
    _randomize_adapters(donor, seed=8)
    lp.save_adapter(donor, tmp_path, name="b")
    lp.load_adapter_state_dict(model, load_file(tmp_path / "adapter_model.safetensors"),
                               name="b")
    lp.set_adapter(model, "b")
    check(["b"])
    assert torch.equal(model.fc.lora_B["b"], donor.fc.lora_B["b"])
    assert backend.graphs == 1


def test_training_compiles_once_per_live_set_and_not_for_alpha_or_weights() -> None:
    # With gradients on, only the live adapters are in the graph (the others get no
    # gradient): a new set of live adapters is a new graph, cached after its first use.
    base, model = _net()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = _ids()
    alphas = {name: alpha for name, (_, alpha) in ADAPTERS.items()}
    for live in (["a"], ["b"], ["a"], ["b"]):
        lp.set_adapter(model, live)
        model.zero_grad()
        out = compiled(ids)
        assert_close(out, _reference(base, model, {n: alphas[n] for n in live})(ids))
        out.sum().backward()
        trained = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        assert trained == sorted(f"{t}.lora_{m}.{live[0]}" for t in TARGETS for m in "AB")
    assert backend.graphs == 2
    for path in TARGETS:
        layer = model.get_submodule(path)
        layer.set_scale("b", 0.25)
        layer.lora_B["b"] = nn.Parameter(layer.lora_B["b"].detach() * 2.0)
    _randomize_adapters(model, seed=7)
    assert_close(compiled(ids), _reference(base, model, {"b": 0.25})(ids))
    assert backend.graphs == 2
    for _ in range(2):
        with lp.disable_adapters(model):
            assert_close(compiled(ids), base(ids))
        assert_close(compiled(ids), _reference(base, model, {"b": 0.25})(ids))
    assert backend.graphs == 3


def test_changes_that_reshape_the_graph_recompile_and_stay_correct() -> None:
    # What docs/scaling.md says recompiles: a new adapter (new parameters and shapes),
    # merge (a merged layer runs the base computation alone), train()/eval().
    base, model = _net({"a": (2, 4.0)})
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = _ids()
    assert_close(compiled(ids), _reference(base, model, {"a": 4.0})(ids))
    lp.inject_lora(model, target=TARGETS, rank=3, alpha=3.0, name="d")
    _randomize_adapters(model, seed=3)
    lp.set_adapter(model, ["a", "d"])
    expected = _reference(base, model, {"a": 4.0, "d": 3.0})(ids)
    assert_close(compiled(ids), expected)
    assert backend.graphs == 2
    lp.merge(model)
    assert_close(compiled(ids), expected)
    assert backend.graphs == 3
    lp.unmerge(model)
    assert_close(compiled(ids), expected)
    assert backend.graphs == 3  # the unmerged graph is cached
    model.eval()
    assert_close(compiled(ids), expected)
    model.train()
    assert_close(compiled(ids), expected)
    assert backend.graphs == 4


def _reference_grads(base: nn.Module, model: nn.Module, live: dict[str, float],
                     ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of mean(out²) w.r.t. the live A and B, through the dense W + Σ s·ΔW.

    ``ids`` must avoid the embedding's padding_idx: the dense lookup blocks every
    gradient through that row, the low-rank lookup only A's (as in PEFT).
    """
    leaves: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for path in TARGETS:
        layer = model.get_submodule(path)
        w = base.get_submodule(path).weight.detach().double()
        for name, alpha in live.items():
            a = leaves[f"{path}.lora_A.{name}"] = layer.lora_A[name].detach().double()
            b = leaves[f"{path}.lora_B.{name}"] = layer.lora_B[name].detach().double()
            a.requires_grad_()
            b.requires_grad_()
            w = w + delta(KIND[path], a, b, alpha / a.shape[0])
        weights[f"{path}.weight"] = w
    ref = copy.deepcopy(base).double()
    torch.func.functional_call(ref, weights, (ids,)).square().mean().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


def test_compiled_gradients_match_the_dense_reference() -> None:
    # Forward and backward through AOTAutograd, with two adapters live.
    base, model = _net()
    lp.set_adapter(model, ["a", "b"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = _ids().clamp(min=1)  # no padding_idx: see _reference_grads
    compiled(ids).square().mean().backward()
    expected = _reference_grads(base, model, {"a": 4.0, "b": 1.0}, ids)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected)  # "c" is not live: no gradient
    for name, grad in expected.items():
        assert_close(grads[name], grad, dtype=torch.float32)


def test_backward_after_a_switch_uses_the_gates_of_its_forward() -> None:
    base, model = _net()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = _ids().clamp(min=1)
    loss = compiled(ids).square().mean()
    lp.set_adapter(model, "b")  # after forward, before backward
    loss.backward()
    expected = _reference_grads(base, model, {"a": 4.0}, ids)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected)
    for name, grad in expected.items():
        assert_close(grads[name], grad, dtype=torch.float32)


class ShiftedLinear(nn.Linear):
    """A Linear whose own forward differs: the adapter is applied through its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + 1.0)


def _layer_cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(5, 4), torch.randn(2, 3, 5)),
        "conv1d": (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 9)),
        # The conv that breaks PEFT: dilation and reflect padding.
        "conv2d": (nn.Conv2d(1, 1, 3, padding=2, dilation=2, padding_mode="reflect"),
                   torch.randn(2, 1, 7, 7)),
        "conv3d": (nn.Conv3d(2, 2, (1, 3, 3), padding=(0, 1, 1), padding_mode="circular"),
                   torch.randn(1, 2, 3, 5, 5)),
        "embedding": (nn.Embedding(9, 4, padding_idx=2), torch.tensor([[1, 2, 8], [0, 5, 2]])),
        "through_weight": (ShiftedLinear(5, 4), torch.randn(3, 5)),
        "transformers_conv1d": (_transformers_conv1d(), torch.randn(2, 3, 5)),
    }


def _transformers_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(4, 5)  # 5 -> 4, weight stored (5, 4)
    nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("case", list(_layer_cases()))
def test_each_layer_type_compiles_with_fullgraph(case: str) -> None:
    module, x = _layer_cases()[case]
    model = nn.Sequential(module)
    ref_base = copy.deepcopy(module).double()
    x64 = x.double() if x.is_floating_point() else x
    rank = 1 if case == "conv2d" else 2
    lp.inject_lora(model, target="0", rank=rank, alpha=3.0)
    lp.inject_lora(model, target="0", rank=rank, alpha=5.0, name="other")
    _randomize_adapters(model, seed=4)
    layer = model[0]
    backend = CountingBackend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    kind = {"embedding": "embedding", "transformers_conv1d": "conv1d"}.get(
        case, "conv" if case.startswith("conv") else "linear")
    shift = 1.0 if case == "through_weight" else 0

    def expected(live: list[str]) -> torch.Tensor:
        weight = ref_base.weight
        for name in live:
            weight = weight + delta(kind, layer.lora_A[name], layer.lora_B[name],
                                    layer.alpha[name] / rank, getattr(module, "groups", 1))
        return dense_forward(ref_base, weight, x64 + shift)

    with torch.no_grad():
        for live in (["default"], ["other"], ["default", "other"]):
            lp.set_adapter(model, live)
            assert_close(compiled(x), expected(live))
    assert backend.graphs == 1
    out = compiled(x)  # with gradients: a graph with the live adapters only
    assert_close(out, expected(["default", "other"]))
    out.sum().backward()
    assert all(p.grad is not None for n, p in layer.named_parameters() if "lora_" in n)


def test_dropout_in_training_mode_compiles_and_reuses_the_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    lp.inject_lora(model, target="0", rank=2, dropout=0.5)
    lp.inject_lora(model, target="0", rank=2, dropout=0.5, name="b")
    _randomize_adapters(model, seed=5)
    model.train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(64, 6)
    with torch.no_grad():
        base = nn.functional.linear(x, model[0].weight, model[0].bias)
        outs = [compiled(x) for _ in range(2)]
        lp.set_adapter(model, "b")
        outs.append(compiled(x))
    # Dropout is live: two calls draw different masks, and the branch is not zero.
    assert not torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], base)
    assert backend.graphs == 1


@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_the_dense_reference_and_does_not_recompile() -> None:
    # The default backend generates and compiles C++ on CPU: tens of seconds.
    base, model = _net()
    counter = torch._dynamo.utils.counters
    counter.clear()
    compiled = torch.compile(model, fullgraph=True)
    ids = _ids()
    assert_close(compiled(ids), _reference(base, model, {"a": 4.0})(ids))
    lp.set_adapter(model, ["b", "c"])
    with torch.no_grad():
        model.fc.lora_B["b"].mul_(-2.0)
    assert_close(compiled(ids), _reference(base, model, {"b": 1.0, "c": 2.0})(ids))
    with lp.disable_adapters(model):
        assert_close(compiled(ids), base(ids))
    assert counter["stats"]["unique_graphs"] == 1


def test_targeting_sees_through_the_compile_prefix() -> None:
    torch.manual_seed(0)
    model = Net()
    base = copy.deepcopy(model)
    compiled = torch.compile(model, backend=CountingBackend(), fullgraph=True)
    assert [n for n, _ in compiled.named_modules() if n.endswith("fc")] == ["_orig_mod.fc"]
    assert lp.find_targets(compiled, ["*c*", "head"], exclude="conv") == ["fc", "head"]
    assert lp.inject_lora(compiled, target=["fc", "head"], rank=2, alpha=4.0) == ["fc", "head"]
    assert isinstance(model.fc, lp.LoRALinear)
    assert lp.adapter_names(compiled) == ["default"]
    assert [s.name for s in lp.summary(compiled).layers] == ["fc", "head"]
    _randomize_adapters(model, seed=6)
    ids = _ids()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path in ("fc", "head"):
            layer = model.get_submodule(path)
            ref.get_submodule(path).weight.add_(
                delta("linear", layer.lora_A["default"], layer.lora_B["default"], 2.0).float()
            )
    assert_close(compiled(ids), ref(ids))


def test_gate_buffers_are_not_saved_and_follow_the_model() -> None:
    base, model = _net()
    expected_keys = sorted(
        [*base.state_dict()]
        + [f"{t}.lora_{m}.{a}" for t in TARGETS for m in "AB" for a in ADAPTERS]
    )
    assert sorted(model.state_dict()) == expected_keys
    model.to(torch.float64)
    assert all(b.dtype == torch.float64 for n, b in model.named_buffers() if "_lora" in n)
    lp.set_adapter(model, "b")  # rewritten gates keep the model's dtype
    assert all(b.dtype == torch.float64 for n, b in model.named_buffers() if "_lora" in n)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = _ids()
    assert_close(compiled(ids), _reference(base.double(), model, {"b": 1.0})(ids))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        lp.set_adapter(clone, "c")
        assert_close(clone(ids), _reference(base.double(), model, {"c": 2.0})(ids))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    assert sorted(torch.load(buffer, weights_only=True)) == expected_keys


def test_gates_written_under_inference_mode_can_be_used_for_training() -> None:
    _, model = _net()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        lp.set_adapter(model, "b")
        compiled(_ids())
    lp.set_adapter(model, ["a", "b"])
    compiled(_ids()).sum().backward()
    assert model.fc.lora_B["b"].grad is not None


def test_adapter_per_sample_under_compile_routes_each_row() -> None:
    base, model = _net()
    compiled = torch.compile(model, backend=CountingBackend())
    ids = _ids()
    with lp.adapter_per_sample(model, ["b", None]):
        out = compiled(ids)
    assert_close(out[0], _reference(base, model, {"b": 1.0})(ids)[0])
    assert_close(out[1], base(ids)[1])


@torch.no_grad()
def test_gates_survive_to_empty_and_a_state_dict_load() -> None:
    # to_empty() leaves every tensor uninitialised; load_state_dict restores parameters,
    # and the gates (not in the state dict) are recomputed from the layer's state.
    base, model = _net()
    lp.set_adapter(model, ["a", "c"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    compiled = torch.compile(model, backend=CountingBackend(), fullgraph=True)
    ids = _ids()
    assert_close(compiled(ids), _reference(base, model, {"a": 4.0, "c": 2.0})(ids))
