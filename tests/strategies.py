"""Hypothesis strategies: base layers of every registered type, their inputs and ranks."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@dataclass
class Case:
    """A base layer wrapped in a container (so it can be replaced), an input and a rank."""

    kind: str  # "linear", "conv", "embedding"
    model: nn.Sequential
    x: Tensor
    rank: int
    alpha: float
    groups: int = 1

    @property
    def base(self) -> nn.Module:
        return self.model[0]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Case({self.base!r}, x={tuple(self.x.shape)}, rank={self.rank}, alpha={self.alpha})"


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def linear_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(st.sampled_from(DTYPES))
    in_f, out_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = nn.Linear(in_f, out_f, bias=draw(st.booleans())).to(dtype)
    x = torch.randn(*lead, in_f, dtype=dtype)
    rank = draw(st.integers(1, min(in_f, out_f) + 1))
    rank = min(rank, min(in_f, out_f))
    return Case("linear", nn.Sequential(layer), x, rank, draw(st.sampled_from([0.5, 1.0, 8.0])))


@st.composite
def conv_cases(draw: st.DrawFn, dims: int | None = None, dtype: torch.dtype | None = None) -> Case:
    dims = dims or draw(st.sampled_from([1, 2, 3]))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding_kind = draw(st.sampled_from(["int", "same", "valid"]))
    if padding_kind == "same" and any(s > 1 for s in stride):
        padding_kind = "int"  # torch refuses padding="same" with stride > 1
    padding: object
    if padding_kind == "int":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    else:
        padding = padding_kind
    size_range = (4, 7) if dims < 3 else (3, 5)
    size = tuple(draw(st.integers(*size_range)) + d * (k - 1) for k, d in zip(kernel, dilation))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    layer = conv_cls(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=draw(st.booleans()), padding_mode=mode).to(dtype)
    x = torch.randn(draw(st.integers(1, 2)), in_ch, *size, dtype=dtype)
    # Any rank up to min(out, in/g·∏k): A is shared by the groups, B per output channel.
    rank = draw(st.integers(1, min(4, out_ch, layer.weight[0].numel())))
    return Case("conv", nn.Sequential(layer), x, rank, draw(st.sampled_from([0.5, 1.0, 8.0])),
                groups=groups)


@st.composite
def embedding_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(st.sampled_from(DTYPES))
    vocab, dim = draw(st.integers(2, 20)), draw(st.integers(1, 8))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    max_norm = draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0])))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = nn.Embedding(vocab, dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=draw(st.sampled_from([1.0, 2.0, 3.0])),
                         scale_grad_by_freq=draw(st.booleans()),
                         sparse=draw(st.booleans())).to(dtype)
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    x = torch.randint(0, vocab, lead)
    rank = draw(st.integers(1, min(vocab, dim)))
    return Case("embedding", nn.Sequential(layer), x, rank, draw(st.sampled_from([0.5, 1.0, 8.0])))


def any_case(dtype: torch.dtype | None = None) -> st.SearchStrategy[Case]:
    """A case of any registered layer type."""
    return st.one_of(linear_cases(dtype), conv_cases(dtype=dtype), embedding_cases(dtype))


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every A and B non-zero values, so ΔW is not zero (fresh B or A is zero)."""
    gen = _seeded(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.5)


# Regexes as adapter configs hold them, and module names to match them against.
NAME_CHARS = "abAB1._\n"
_REGEX_LEAVES = ["a", "b", "A", ".", r"\.", "[ab.]", "[^a]", r"\w", r"\d", r"\W", "(?:)", "^",
                 "$", r"\b", r"\B", r"\A", r"\Z", "(?<=a)", "(?<![b.])", r"\n"]
_QUANTIFIERS = ["*", "+", "?", "{2}", "{0,2}", "{1,3}", "*?", "+?", "??", "{0,2}?"]


def _regex_step(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(inner, min_size=1, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda alts: "(?:" + "|".join(alts) + ")"),
        st.lists(inner, min_size=2, max_size=3).map(lambda alts: "(" + "|".join(alts) + ")"),
        st.tuples(inner, st.sampled_from(_QUANTIFIERS)).map(lambda t: f"(?:{t[0]}){t[1]}"),
        inner.map(lambda r: f"(?i:{r})"),
        inner.map(lambda r: f"(?={r})"),
        inner.map(lambda r: f"(?!{r})"),
    )


#: Regexes without backreferences, over a small alphabet, optionally with global flags.
regexes = st.tuples(
    st.sampled_from(["", "(?i)", "(?m)", "(?s)", "(?a)"]),
    st.recursive(st.sampled_from(_REGEX_LEAVES), _regex_step, max_leaves=8),
).map("".join)
module_names = st.text(alphabet=NAME_CHARS, max_size=8)
#: Literal patterns as save_adapter writes them: escaped names, "^" anchors, alternations.
literal_regexes = st.lists(
    st.tuples(st.booleans(), st.text(alphabet="ab.^$|*\\\n", max_size=5)),
    min_size=1, max_size=3,
).map(lambda alts: "|".join(("^" if anchored else "") + re.escape(text)
                            for anchored, text in alts))


# --------------------------------------------------------------------------- bare parameters
class ParamLinear(nn.Module):
    """A linear map on its own parameter stored (in, out), as PEFT's test model has it."""

    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_f, out_f) / in_f**0.5)
        self.bias = nn.Parameter(torch.randn(out_f))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class Experts(nn.Module):
    """E expert matrices, expert e applied to x[e]: weight (E, out, in), or (E, in, out)
    when ``is_transposed`` (the flag PEFT reads)."""

    def __init__(self, experts: int, in_f: int, out_f: int, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (experts, in_f, out_f) if transposed else (experts, out_f, in_f)
        self.weight = nn.Parameter(torch.randn(*shape) / in_f**0.5)

    def forward(self, x: Tensor) -> Tensor:  # x (E, T, in) -> (E, T, out)
        w = self.weight if self.is_transposed else self.weight.transpose(1, 2)
        return torch.bmm(x, w)


class OwnConv(nn.Module):
    """A convolution on its own 4-D parameter (a type the registry does not know)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel) / in_ch)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(x, self.kernel, padding=1)


@dataclass
class ParamCase:
    """A module adapted through one of its parameters, wrapped in a container."""

    model: nn.Sequential
    parameter: str
    x: Tensor
    rank: int
    alpha: float

    @property
    def owner(self) -> nn.Module:
        return self.model[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.owner._parameters[self.parameter].shape)

    def __repr__(self) -> str:
        return (f"ParamCase({type(self.owner).__name__} {self.parameter}{self.shape}, "
                f"x={tuple(self.x.shape)}, rank={self.rank}, alpha={self.alpha})")


@st.composite
def parameter_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> ParamCase:
    dtype = dtype or draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["matrix", "experts", "experts_t", "conv"]))
    a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "matrix":
        owner, name, x, most = ParamLinear(a, b), "weight", torch.randn(3, a), min(a, b)
    elif kind == "conv":
        owner, name = OwnConv(a, b, 3), "kernel"
        x, most = torch.randn(2, a, 5, 5), min(b, 9 * a)
    else:
        experts = draw(st.integers(1, 3))
        owner, name = Experts(experts, a, b, kind == "experts_t"), "weight"
        x, most = torch.randn(experts, 4, a), min(a, b)
    rank = draw(st.integers(1, most))
    return ParamCase(nn.Sequential(owner).to(dtype), name, x.to(dtype), rank,
                     draw(st.sampled_from([0.5, 1.0, 8.0])))
