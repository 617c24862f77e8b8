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


@st.composite
def conv1d_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out))."""
    from transformers.pytorch_utils import Conv1D

    dtype = dtype or draw(st.sampled_from(DTYPES))
    in_f, out_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = Conv1D(out_f, in_f).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()  # Conv1D starts its bias at zero: make it matter
    x = torch.randn(*lead, in_f, dtype=dtype)
    rank = draw(st.integers(1, min(in_f, out_f)))
    return Case("conv1d", nn.Sequential(layer), x, rank, draw(st.sampled_from([0.5, 1.0, 8.0])))


def any_case(dtype: torch.dtype | None = None) -> st.SearchStrategy[Case]:
    """A case of any registered layer type called with one tensor."""
    return st.one_of(linear_cases(dtype), conv_cases(dtype=dtype), embedding_cases(dtype),
                     conv1d_cases(dtype))


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


@dataclass
class AttentionCase:
    """An ``nn.MultiheadAttention`` in a container, its call, and which parts to adapt.

    ``parts`` are target names relative to the attention: ``""`` (the attention itself:
    in_proj and out_proj), ``"q"``, ``"k"``, ``"v"``, ``"out_proj"``.
    """

    model: nn.Sequential
    args: tuple[Tensor, Tensor, Tensor]
    kwargs: dict
    parts: tuple[str, ...]
    rank: int
    alpha: float

    @property
    def base(self) -> nn.MultiheadAttention:
        return self.model[0]

    @property
    def targets(self) -> list[str]:
        return [f"0.{p}" if p else "0" for p in self.parts]

    def __repr__(self) -> str:
        shapes = [tuple(t.shape) for t in self.args]
        masks = {k: (tuple(v.shape), v.dtype) if isinstance(v, Tensor) else v
                 for k, v in self.kwargs.items()}
        return (f"AttentionCase({self.base!r}, batch_first={self.base.batch_first}, "
                f"inputs={shapes}, {masks}, parts={self.parts}, rank={self.rank})")


@st.composite
def attention_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> AttentionCase:
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    e = heads * head_dim
    separate = draw(st.booleans())
    kdim, vdim = (draw(st.integers(1, 6)), draw(st.integers(1, 6))) if separate else (None, None)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    mha = nn.MultiheadAttention(
        e, heads, bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()), kdim=kdim, vdim=vdim,
        batch_first=draw(st.booleans())).to(dtype)
    with torch.no_grad():  # torch starts the biases at zero: make them matter
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batched = draw(st.booleans())
    n, tgt, src = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))

    def shape(length: int, dim: int) -> tuple[int, ...]:
        if not batched:
            return (length, dim)
        return (n, length, dim) if mha.batch_first else (length, n, dim)

    query = torch.randn(*shape(tgt, e), dtype=dtype)
    mode = draw(st.sampled_from(["self", "kv-same", "all-different"]))
    if mode == "self" and not separate:
        key = value = query
        src = tgt
    else:
        key = torch.randn(*shape(src, kdim or e), dtype=dtype)
        value = key if mode == "kv-same" and kdim == vdim else \
            torch.randn(*shape(src, vdim or e), dtype=dtype)
    kwargs = _attention_kwargs(draw, n if batched else None, heads, tgt, src, dtype)
    options = ["q", "k", "v", "out_proj"] + ([""] if not separate else [])
    parts = tuple(sorted(draw(st.sets(st.sampled_from(options), min_size=1))))
    rank = min(draw(st.integers(1, 3)), e, kdim or e, vdim or e)  # at most ΔW's rank
    return AttentionCase(nn.Sequential(mha), (query, key, value), kwargs, parts, rank,
                         draw(st.sampled_from([0.5, 1.0, 8.0])))


def _attention_kwargs(draw: st.DrawFn, n: int | None, heads: int, tgt: int, src: int,
                      dtype: torch.dtype) -> dict:
    kwargs: dict = {"need_weights": draw(st.booleans()),
                    "average_attn_weights": draw(st.booleans())}
    as_bool = draw(st.booleans())  # both masks of one kind (torch deprecates mixing them)
    if n is not None and draw(st.booleans()):  # key_padding_mask: (N, S), never a full row
        pad = torch.rand(n, src) < 0.3
        pad[:, 0] = False
        kwargs["key_padding_mask"] = pad if as_bool else torch.where(pad, -1e4, 0.0).to(dtype)
    attn_kind = draw(st.sampled_from(["none", "2d", "3d", "causal"]))
    if attn_kind == "causal" and tgt == src:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt, dtype=dtype)
        kwargs["attn_mask"] = torch.isinf(causal) if as_bool else causal
        kwargs["is_causal"] = True
    elif attn_kind in ("2d", "3d"):
        shape = (tgt, src) if attn_kind == "2d" or (n is None and heads == 1) else \
            ((n or 1) * heads, tgt, src)
        mask = torch.rand(*shape) < 0.3
        mask[..., 0] = False
        kwargs["attn_mask"] = mask if as_bool else torch.where(mask, float("-inf"), 0.0).to(dtype)
    return kwargs


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
