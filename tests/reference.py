"""An independent dense reference: the adapted function computed as F.* with W + ΔW.

Nothing here imports loraplug internals: ΔW is built from the raw A, B tensors with the
formulas of the docs, so a bug in the library cannot hide in its own reference.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: (rtol, atol) per dtype, relative to values of order one.
_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Keyword arguments for torch.testing.assert_close at ``dtype``."""
    rtol, atol = _TOLERANCE[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> None:
    """assert_close with the tolerance of ``dtype`` (default: actual's), scaled by ``scale``."""
    rtol, atol = _TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale,
                               atol=atol * scale)


def delta(kind: str, a: Tensor, b: Tensor, scaling: float, groups: int = 1) -> Tensor:
    """ΔW in float64 from raw adapter tensors (formulas from docs/concepts.md).

    ``groups`` does not change a convolution's ΔW: A is shared by the groups and B is
    per output channel, over the weight's matrix view (out, in/g·k…).
    """
    a, b = a.double(), b.double()
    if kind == "linear":
        return scaling * b @ a
    if kind == "embedding":
        return scaling * (b @ a).t()
    if kind == "conv1d":  # transformers' Conv1D stores W as (in, out)
        return scaling * (b @ a).t()
    # conv, any groups: (out, r) @ (r, in/g·k…) over the weight's matrix view (out, in/g·k…),
    # element by element: ΔW[o, c, k…] = s · Σ_j B[o, j] · A[j, c, k…].
    out, r = b.shape[0], a.shape[0]
    flat = a.reshape(r, -1)
    rows = [sum(b.reshape(out, r)[o, j] * flat[j] for j in range(r)) for o in range(out)]
    return scaling * torch.stack(rows).reshape(out, *a.shape[1:])


def dense_forward(base: nn.Module, weight: Tensor, x: Tensor) -> Tensor:
    """``base``'s own function with ``weight`` in place of its weight, via F.* directly."""
    bias = getattr(base, "bias", None)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    if type(base).__name__ == "Conv1D":  # transformers' Conv1D: x W + b, W (in, out)
        return x @ weight + bias
    if isinstance(base, nn.Embedding):
        return F.embedding(x, weight.clone(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, False)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    else:
        padding = base.padding
    return conv(x, weight, bias, base.stride, padding, base.dilation, base.groups)


def attention_dense(mha: nn.MultiheadAttention, deltas: dict[str, Tensor], query: Tensor,
                    key: Tensor, value: Tensor, **kwargs: object) -> tuple[Tensor, Tensor | None]:
    """``mha``'s function in float64 with its weights plus ``deltas``, via F.* directly.

    ``deltas`` maps ``"in_proj"`` (3E, E), ``"q"``/``"k"``/``"v"`` (E, E_in) and
    ``"out_proj"`` (E, E) to ΔW (from :func:`delta`); missing keys add nothing. Computed
    with ``F.multi_head_attention_forward`` in float64, eval mode unless ``training`` is
    passed, the batch_first transposes done here.
    """
    mha = copy.deepcopy(mha).double()
    e = mha.embed_dim
    zero = {p: 0 for p in ("in_proj", "q", "k", "v", "out_proj")}
    d = {**zero, **{k: v.double() for k, v in deltas.items()}}
    if mha._qkv_same_embed_dim:
        parts = [d[p] if torch.is_tensor(d[p]) else torch.zeros(e, e, dtype=torch.float64)
                 for p in "qkv"]
        in_proj = mha.in_proj_weight.double() + d["in_proj"] + torch.cat(parts)
        separate = {}
    else:
        in_proj = None
        separate = {f"{p}_proj_weight": getattr(mha, f"{p}_proj_weight").double() + d[p]
                    for p in "qkv"}
    training = bool(kwargs.pop("training", False))
    batched = query.dim() == 3
    q, k, v = (t.double() for t in (query, key, value))
    if mha.batch_first and batched:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, weights = F.multi_head_attention_forward(
        q, k, v, e, mha.num_heads, in_proj, mha.in_proj_bias, mha.bias_k, mha.bias_v,
        mha.add_zero_attn, mha.dropout, mha.out_proj.weight.double() + d["out_proj"],
        mha.out_proj.bias, training=training, use_separate_proj_weight=in_proj is None,
        **separate, **kwargs)
    if mha.batch_first and batched:
        out = out.transpose(0, 1)
    return out, weights


def parameter_delta(a: Tensor, b: Tensor, scaling: float, shape: tuple[int, ...],
                    transposed: bool = False) -> Tensor:
    """ΔW in float64 for a bare parameter of ``shape``, indexed element by element.

    Matrix layout (2 dims, or 4 and more): ``B (out, r) @ A (r, ∏rest)`` reshaped to
    ``shape``. Experts (3 dims, PEFT's layout): expert e uses rows ``e·r … e·r + r - 1``
    of A (E·r, in) and columns ``j·E + e`` (j < r) of B (out, r·E); its block is
    ``B_e @ A_e`` (out, in), transposed when the stack is stored (E, in, out).
    """
    a, b = a.double(), b.double()
    if len(shape) != 3:
        return scaling * (b @ a.reshape(a.shape[0], -1)).reshape(shape)
    experts = shape[0]
    r = a.shape[0] // experts
    blocks = []
    for e in range(experts):
        a_e = a[e * r:(e + 1) * r]
        b_e = b[:, [j * experts + e for j in range(r)]]
        block = b_e @ a_e
        blocks.append(block.t() if transposed else block)
    return scaling * torch.stack(blocks)
