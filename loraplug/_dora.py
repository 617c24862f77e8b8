"""DoRA: weight-decomposed low-rank adaptation, for every layer type that writes ΔW = B A.

DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353) splits the adapted weight into
a direction and a trained magnitude m per output channel c:

    W' = m ⊙ V / ‖V‖,    V = W + s·ΔW,    ‖V‖_c = the norm of V's channel c,

m starting at ‖W + s·ΔW‖ so that a fresh adapter changes nothing. As in the paper (§4.3)
and PEFT, ‖V‖ is treated as a constant in training (no gradient flows through it). The
forward adds, to the base output y = W x + b,

    (f − 1) ⊙ (W x) + f ⊙ s·B A x,    f = m / ‖V‖,

which with one adapter is f ⊙ (W x + s·B A x) + b; with dropout on the branch's input in
training, ``W x`` is recomputed on the dropped-out input, as PEFT does.

Everything here works on ΔW's matrix form (see ``_inits``): W (m, n) with ΔW = B A,
whose rows are DoRA's channels: a Linear's outputs, a convolution's
output channels, an embedding's dimensions (the columns of W). So one implementation
serves every such layer type; a layer type supports DoRA by saying how a per-channel
factor broadcasts over its output (:meth:`LoRALayer.channel_shape`), which is also the
shape PEFT stores the magnitude in: Linear and Embedding (C,), Conv (1, C, 1…).

The norm is never built from a dense ΔW: per channel,

    ‖W + s·B A‖² = ‖W‖² + 2s ⟨B, W Aᵀ⟩ + s² ⟨B (A Aᵀ), B⟩,

one product W Aᵀ (out·in·r multiply-adds, no weight-sized temporary) and r×r ones; ‖W‖²
is computed once and reused while W is unchanged (its version counter).

Merging writes W' = W ⊙ (1 + Σ_d (f_d − 1)) + Σ_d s_d·ΔW(A_d, f_d ⊙ B_d) + Σ_l s_l·ΔW_l over
DoRA adapters d and plain ones l, with every f_d from the unmerged W. The norms used are
kept in the buffers ``lora_dora_norm.<name>`` (part of ``state_dict``), so unmerging
divides by the same numbers: after a restart too, from saved tensors alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._matrix import as_matrix, form_problem, matrix_shape, transposed
from ._products import compute_dtype

if TYPE_CHECKING:
    from ._layer import LoRALayer


class BufferDict(nn.Module):
    """Buffers keyed by adapter name: ``state_dict`` keys ``<prefix>.<name>``."""

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[name]  # type: ignore[return-value]

    def __setitem__(self, name: str, value: Tensor) -> None:
        self._buffers[name] = value

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers


def _store(layer: LoRALayer, key: str) -> dict[str, Tensor]:
    # The parameters (buffers for the norms) of registry ``key``, or {} before any DoRA.
    module = layer._modules.get(key)
    if module is None:
        return {}
    return module._buffers if key == "lora_dora_norm" else module._parameters  # type: ignore[return-value]


def dora_problem(layer: LoRALayer, rank: int) -> str | None:
    """Why DoRA cannot work on ``layer`` with rank ``rank``, or ``None``."""
    if getattr(layer, "weight_format", None) is not None:
        return ("DoRA needs the weight's per-channel norms, and this layer's weight is stored "
                "quantized; inject this layer without dora=True.")
    m, _ = matrix_shape(layer)
    if not form_problem(layer, rank) and layer.channel_shape(m) is not None:
        return None
    return (f"DoRA needs a per-output-channel magnitude, which {type(layer).__name__} does not "
            "declare (DoRA is available on Linear, Conv1d/2d/3d and Embedding layers, as in "
            "PEFT); inject this layer without dora=True.")


def weight_norm_sq(layer: LoRALayer) -> Tensor:
    """‖W‖² per channel, (m,) in :func:`compute_dtype`; cached while W is unchanged."""
    weight = layer._tensor("weight")
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    cached = layer.__dict__.get("_dora_weight_sq")
    if cached is not None and cached[0] == key and not torch.compiler.is_compiling():
        return cached[1]
    with torch.no_grad():
        value = as_matrix(layer, weight.detach()).to(compute_dtype(weight.dtype)).square().sum(-1)
    if not torch.compiler.is_compiling():
        layer.__dict__["_dora_weight_sq"] = (key, value)
    return value


@torch.no_grad()
def channel_norm(layer: LoRALayer, a: Tensor, b: Tensor, scale: float | Tensor,
                 weight: Tensor | None = None) -> Tensor:
    """‖W + s·ΔW(A, B)‖ per channel, (C,) in :func:`compute_dtype`, without a gradient.

    ``weight`` defaults to the layer's own (whose ‖W‖² is then cached).
    """
    w = layer._tensor("weight") if weight is None else weight
    dtype = compute_dtype(w.dtype)
    wm = as_matrix(layer, w.detach())
    am = a.detach().reshape(a.shape[0], -1)
    bm = b.detach().reshape(wm.shape[0], -1).to(dtype)
    w_sq = weight_norm_sq(layer) if weight is None else wm.to(dtype).square().sum(-1)
    cross = (wm @ am.to(wm.dtype).t()).to(dtype)  # W Aᵀ: (m, r)
    am = am.to(dtype)
    gram = am @ am.t()  # A Aᵀ: (r, r)
    # ‖W + s B A‖² per row = ‖W‖² + 2s ⟨B, W Aᵀ⟩ + s² ⟨B, B A Aᵀ⟩, without forming ΔW.
    sq = w_sq + 2 * scale * (bm * cross).sum(-1) + scale * scale * ((bm @ gram) * bm).sum(-1)
    return sq.clamp_min(0).sqrt()


def initial_magnitude(layer: LoRALayer, a: Tensor, b: Tensor, scale: float,
                      weight: Tensor) -> Tensor:
    """m = ‖W + s·ΔW‖ in the magnitude's shape (:meth:`channel_shape`) and W's dtype."""
    norm = channel_norm(layer, a, b, scale, weight)
    return norm.reshape(layer.channel_shape(norm.numel())).to(weight.dtype)  # type: ignore[arg-type]


def factor(layer: LoRALayer, name: str, scale: float | Tensor) -> Tensor:
    """f = m / ‖W + s·ΔW‖ in the magnitude's shape; differentiable in m only."""
    a, b = layer._adapter(name)
    magnitude = _store(layer, "lora_magnitude_vector")[name]
    norm = channel_norm(layer, a, b, scale)
    return magnitude / norm.view(magnitude.shape).to(magnitude.dtype)


def scaled_b(layer: LoRALayer, b: Tensor, f: Tensor, dtype: torch.dtype) -> Tensor:
    """B with its channel rows multiplied by ``f``: ΔW(A, f ⊙ B) = f ⊙ ΔW(A, B)."""
    m, _ = matrix_shape(layer)
    return (b.to(dtype).reshape(m, -1) * f.to(dtype).reshape(m, 1)).reshape(b.shape)


def weight_view(layer: LoRALayer, f: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over the weight (channels are its rows,
    or its columns for a transposed ΔW)."""
    weight = layer._tensor("weight")
    if transposed(layer):
        return f.reshape(1, -1)
    return f.reshape(-1, *([1] * (weight.dim() - 1)))


def fold(layer: LoRALayer, target: Tensor, names: Iterable[str],
         scales: Mapping[str, float | Tensor], sign: int) -> None:
    """``target`` (weight-shaped, compute dtype) += sign · D, the change merging ``names``
    makes to the weight.

    With f_d = m_d / ‖W + s_d·ΔW_d‖ and k = Σ_d (f_d − 1) over the DoRA adapters d, merging
    turns W into W' = (1 + k) ⊙ W + F, F = Σ_d f_d ⊙ s_d ΔW_d + Σ_l s_l ΔW_l, so
    D = k ⊙ W + F. While ``names`` are merged the layer holds W', W is gone, and the norms
    come from ``lora_dora_norm``: D = (k ⊙ W' + F) / (1 + k).
    """
    names = tuple(names)
    mags = _store(layer, "lora_magnitude_vector")
    stored = _store(layer, "lora_dora_norm")
    merged = all(n in layer.merged_adapters for n in names if n in mags)
    factors: dict[str, Tensor] = {}
    for name in names:
        if name in mags:
            a, b = layer._adapter(name)
            norm = stored[name] if merged else channel_norm(layer, a, b, scales[name])
            factors[name] = mags[name].reshape(-1).to(target.dtype) / norm.to(target.dtype)
    change = torch.zeros_like(target)
    for name in names:
        a, b = layer._adapter(name)
        if name in factors:
            b = scaled_b(layer, b, factors[name], target.dtype)
        layer.add_delta(change, a, b, scales[name])
    if factors:
        k = torch.stack(list(factors.values())).sum(0) - len(factors)
        weight = layer._tensor("weight").detach().to(target.dtype)
        change.add_(weight * weight_view(layer, k))
        if merged:
            change.div_(weight_view(layer, 1 + k))
    target.add_(change, alpha=sign)


@torch.no_grad()
def store_norms(layer: LoRALayer, names: Iterable[str]) -> None:
    """Record ‖W + s·ΔW‖ of the DoRA adapters in ``names`` (before merging them)."""
    mags = _store(layer, "lora_magnitude_vector")
    stored = _store(layer, "lora_dora_norm")
    for name in names:
        if name in mags:
            a, b = layer._adapter(name)
            stored[name] = channel_norm(layer, a, b, layer.scaling[name]).to(stored[name].dtype)


def forward(layer: LoRALayer, x: Tensor, names: tuple[str, ...],
            scales: Mapping[str, float | Tensor], biases: Mapping[str, Tensor]) -> Tensor:
    """The layer's output with adapters ``names`` live, some of them DoRA adapters.

    ``biases``: B's bias of the plain adapters that have one.
    """
    mags = _store(layer, "lora_magnitude_vector")
    out = layer.base_forward(x)
    bias = layer._parameters.get("bias")
    if len(names) == 1 and not (layer.training and layer.dropout[names[0]]) \
            and type(scales[names[0]]) is float:
        # One DoRA adapter: f ⊙ (W x + s·B A x) + b = f ⊙ (y + s·B A x) + (1 − f) ⊙ b, with
        # the branch accumulated into the base output y and one pass over the output.
        name = names[0]
        f = factor(layer, name, scales[name])
        a, b = layer._adapter(name)
        out = layer.add_lora(out, x, a, b, scales[name])
        f = f.to(out.dtype)
        if bias is None:
            return out * f
        return torch.addcmul(bias.view(f.shape).to(out.dtype) * (1 - f), out, f)
    return _forward_general(layer, x, names, scales, out, bias, mags, biases)


def _without_bias(layer: LoRALayer, x: Tensor, bias: Tensor | None, shape: torch.Size) -> Tensor:
    y = layer.base_forward(x)
    return y if bias is None else y.sub_(bias.view(shape).to(y.dtype))


def _forward_general(layer: LoRALayer, x: Tensor, names: tuple[str, ...],
                     scales: Mapping[str, float | Tensor], out: Tensor, bias: Tensor | None,
                     mags: Mapping[str, Tensor], biases: Mapping[str, Tensor]) -> Tensor:
    # Each DoRA adapter d adds (f_d − 1) ⊙ W x + f_d ⊙ s_d·B_d A_d x to the base output,
    # W x taken from the base output computed once (or recomputed on a dropped-out input).
    shape = next(mags[n] for n in names if n in mags).shape
    # W x, kept apart from ``out``, which add_lora may write into.
    plain = out.clone() if bias is None else out - bias.view(shape).to(out.dtype)
    for name in names:
        a, b = layer._adapter(name)
        dropped = layer.training and layer.dropout[name]
        h = layer.lora_dropout[name](x) if dropped else x
        if name not in mags:
            out = layer.add_lora(out, h, a, b, scales[name])
            if name in biases:
                out = out + scales[name] * biases[name].view(shape).to(out.dtype)
            continue
        f = factor(layer, name, scales[name])
        base = _without_bias(layer, h, bias, f.shape) if dropped else plain
        mixed = layer.add_lora(base.clone(), h, a, b, scales[name])  # W h + s·B A h
        step = mixed * f.to(mixed.dtype) - base
        if isinstance(scales[name], Tensor):  # a gated adapter (torch.compile) adds nothing
            step = step * (scales[name] != 0)
        out = out + step
    return out
