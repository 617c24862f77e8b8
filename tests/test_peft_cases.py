"""PEFT's own LoRA test configurations (its tests/test_custom_models.py ``TEST_CASES``).

Each configuration is trained a little in PEFT (every trainable tensor moved off its
start), saved with ``save_pretrained``, loaded with ``load_adapter``, and must give
PEFT's outputs: plain, merged, and unmerged again; in training mode the gradients of
every trained tensor must agree too. Then the other way: loraplug saves, PEFT loads.
The models are small ones of the same kinds (MLP, embedding + transformers Conv1D,
Conv1d/2d/3d, grouped and 1×1 convolutions); the configurations are PEFT's.

The research variants among PEFT's LoRA cases (VeLoRA ×3, KaSA, MonteCLoRA, BD-LoRA ×3)
are out of scope. Cases whose layer types are not registered here (transformers'
Conv1D, nn.MultiheadAttention, bare parameters) or whose file layout is not read
(PEFT's grouped-convolution A) are skipped with the reason, so they run as soon as
those layer types exist.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import loraplug as lp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:the rank exceeds the rank"),
              pytest.mark.filterwarnings("ignore:.*LoRA tensor.s. have invalid shape")]

#: Relative to the largest output: float32 through different summation orders.
RELATIVE = 1e-5


def conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = conv1d_type()(1, 5)  # type: ignore[misc]
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin0(torch.relu(self.conv1d(self.emb(ids))).flatten(1))


class Conv(nn.Module):
    """One convolution of ``dims`` dimensions, then a Linear, as PEFT's Conv models."""

    def __init__(self, dims: int, in_ch: int = 5, out_ch: int = 10, kernel: int = 3,
                 groups: int = 1) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        setattr(self, f"conv{dims}d", conv(in_ch, out_ch, kernel, padding=kernel // 2,
                                           groups=groups))
        self.dims, self.in_ch = dims, in_ch
        self.lin0 = nn.Linear(out_ch, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = getattr(self, f"conv{self.dims}d")(x)
        return self.lin0(torch.relu(h).mean(tuple(range(2, h.dim()))))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.mha(x, x, x, need_weights=False)[0])


class ParamLinear(nn.Module):
    """A layer that is a bare weight parameter, read by its own forward."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class MlpUsingParameters(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = ParamLinear(10, 20)  # type: ignore[assignment]


MODELS = {
    "MLP": (MLP, lambda g: torch.randn(9, 10, generator=g)),
    "EmbConv1D": (EmbConv1D, lambda g: torch.randint(0, 100, (9, 10), generator=g)),
    "Conv1d": (lambda: Conv(1), lambda g: torch.randn(4, 5, 12, generator=g)),
    "Conv2d": (lambda: Conv(2), lambda g: torch.randn(4, 5, 6, 6, generator=g)),
    "Conv2dGroups": (lambda: Conv(2, 16, 32, groups=2), lambda g: torch.randn(
        2, 16, 6, 6, generator=g)),
    "Conv2dGroups2": (lambda: Conv(2, 16, 32, groups=16), lambda g: torch.randn(
        2, 16, 6, 6, generator=g)),
    "Conv3d": (lambda: Conv(3), lambda g: torch.randn(2, 5, 4, 4, 4, generator=g)),
    "Conv3d1x1": (lambda: Conv(3, kernel=1), lambda g: torch.randn(2, 5, 4, 4, 4, generator=g)),
    "MHA": (MHA, lambda g: torch.randn(3, 4, 10, generator=g)),
    "MlpUsingParameters": (MlpUsingParameters, lambda g: torch.randn(9, 10, generator=g)),
}

#: PEFT's LoRA TEST_CASES (name, model, config), the research variants left out.
CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4,
                                   "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"],
                                             "use_dora": True}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"],
                                             "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True,
                                             "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"],
                                                             "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"],
                                                             "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"],
                                                             "use_dora": True}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", {
        "target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"],
                                           "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"],
                                                      "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"],
                                                        "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"],
                                           "use_dora": True}),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv3d"]}),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"],
                                                    "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"],
                                                  "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"],
                                                  "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"],
                                              "target_parameters": ["lin1.weight"]}),
]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


def why_not(model_id: str, config: dict) -> str | None:
    """Why this case cannot run here (a layer type or file layout from elsewhere)."""
    if model_id == "Conv2dGroups2":
        return ("PEFT refuses this case itself: rank 8 is not divisible by groups=16 "
                "(loraplug takes any rank there: tests/test_any_model.py)")
    if model_id == "EmbConv1D" and conv1d_type() is None:
        return "transformers is not installed"
    if "conv1d" in config.get("target_modules", ()) and model_id == "EmbConv1D" \
            and lp.lora_layer_type(conv1d_type()) is None:  # type: ignore[arg-type]
        return "no LoRA layer type for transformers' Conv1D is registered"
    if model_id == "MHA" and lp.lora_layer_type(nn.MultiheadAttention) is None:
        return "no LoRA layer type for nn.MultiheadAttention is registered"
    return None


def peft_trained(base: nn.Module, path: Path, config: dict) -> nn.Module:
    """PEFT's model for ``config``, every trainable tensor moved, saved to ``path``."""
    config = {"init_lora_weights": False, **config}
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen) * p.abs().mean().clamp_min(0.1))
    model.save_pretrained(str(path))
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a training step by tensor, under names both libraries share."""
    model.train()
    model.zero_grad()
    model(x).pow(2).sum().backward()
    model.eval()
    names = {}
    for key, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = re.sub(r"^base_model\.model\.|\.weight$|\.default(?=\.|$)", "", key)
            key = key.replace("lora_embedding_", "lora_").replace("lora_B.bias", "lora_B_bias")
            key = key.replace(".base_layer.", ".")  # PEFT's name for an attention's parts
            key = re.sub(r"\.lora_parameters\.[^.]+(?=\.lora_)", "", key)  # a bare parameter's
            names[key.replace("token_adapter.", "")] = p.grad
    return names


@pytest.mark.parametrize(("case", "model_id", "config"), CASES, ids=[c[0] for c in CASES])
def test_peft_case_loads_with_peft_outputs(case: str, model_id: str, config: dict,
                                           tmp_path: Path) -> None:
    reason = why_not(model_id, config)
    if reason:
        pytest.skip(reason)
    build, make_input = MODELS[model_id]
    torch.manual_seed(0)
    base = build().eval()
    x = make_input(torch.Generator().manual_seed(1))
    theirs = peft_trained(base, tmp_path / "peft", config)
    expected = outputs(theirs, x)
    assert relative_error(outputs(base, x), expected) > 1e-4  # the adapter matters

    ours = copy.deepcopy(base)
    if model_id.startswith("Conv2dGroups") and config.get("use_dora"):
        # DoRA's magnitude divides by the norm of W + ΔW, and PEFT's grouped ΔW has no
        # weight-shaped form: refused with the reason, the model left as it was.
        with pytest.raises(lp.AdapterFileError, match="DoRA magnitude needs ΔW in the weight"):
            lp.load_adapter(ours, tmp_path / "peft")
        assert not any(isinstance(m, lp.LoRALayer) for m in ours.modules())
        return
    lp.load_adapter(ours, tmp_path / "peft")
    assert relative_error(outputs(ours, x), expected) <= RELATIVE
    if not config.get("lora_dropout"):
        ours_grads, theirs_grads = gradients(ours, x), gradients(theirs, x)
        assert set(theirs_grads) <= set(ours_grads)  # MiCA freezes B in PEFT; ours trains it
        for key, grad in theirs_grads.items():
            if ".out_proj." in key:
                # PEFT adds an attention's out_proj branch twice in its forward (its B acts
                # doubled, docs/files.md) but carries a gradient through one of the two.
                continue
            assert relative_error(ours_grads[key], grad) <= RELATIVE, key
    if model_id.startswith("Conv2dGroups"):
        # PEFT's A of a grouped convolution reads every input channel: its ΔW is not block
        # diagonal, so no grouped weight can hold it. It runs unmerged; merging says why.
        with pytest.raises(lp.StateError, match="not block diagonal"):
            lp.merge(ours)
    else:
        lp.merge(ours)
        assert relative_error(outputs(ours, x), expected) <= RELATIVE
        lp.unmerge(ours)
    assert relative_error(outputs(ours, x), expected) <= RELATIVE

    lp.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert relative_error(outputs(again, x), expected) <= RELATIVE


def test_every_case_is_listed_once() -> None:
    # PEFT's LoRA cases without the research variants (VeLoRA ×3, KaSA, MonteCLoRA,
    # BD-LoRA ×3), which carry configurations of their own.
    assert len(CASES) == 40
    assert len({c[0] for c in CASES}) == len(CASES)
