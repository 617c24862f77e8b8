"""LoRA for ``nn.MultiheadAttention``: its input projection (q, k, v) and output projection.

``nn.MultiheadAttention`` keeps q, k and v in one parameter ``in_proj_weight`` (3E, E)
(or in ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight``
(E, vdim) when kdim or vdim differ from E) and reads ``out_proj.weight`` itself, so no
child module is ever called. :class:`LoRAMultiheadAttention` computes the attention
itself (``_attention.py``, torch's composite path op for op) with adapted projections:

    [q k v] = x W_inᵀ + b_in + s · (x Aᵀ) Bᵀ      in_proj adapter:  A (r, E), B (3E, r)
    q      += s_q · (x A_qᵀ) B_qᵀ                    part q:           A_q (r, E), B_q (E, r)
                                                     (k, v likewise, with kdim, vdim inputs)
    out     = out_proj(attention)                    out_proj:         a LoRALinear

An adapter lives in one of four places:

- the layer itself: PEFT's in_proj adapter, one A shared by q, k and v
  (``<path>.lora_A.weight``), only when kdim = vdim = E;
- the children ``q``, ``k``, ``v``: :class:`LoRAProjection` layers, each with its own A and
  B (the classic recipe adapts q and v only);
- the child ``out_proj``: a :class:`LoRALinear` around the original ``out_proj``.

Targeting the attention module adapts in_proj and out_proj, as PEFT does (q, k, v and
out_proj when kdim or vdim differ from E); ``<path>.q``, ``<path>.k``, ``<path>.v`` and
``<path>.out_proj`` name the parts. While no adapter is live (merged, disabled, none
active), ``forward`` is torch's own ``MultiheadAttention.forward``, fast path included.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _attention
from ._compile import gated_adapters
from ._layer import LoRALayer
from ._linear import LoRALinear
from ._products import Scale, add_scaled_product
from ._registry import register_lora_layer

#: One low-rank term of the input projection: rows [lo, hi) of the packed 3E rows, A, B,
#: scaling, and the dropout module for its input (None when dropout is off).
Term = tuple[int, int, Tensor, Tensor, Scale, "nn.Module | None"]


class AttentionProjection(nn.Module):
    """q, k or v of an ``nn.MultiheadAttention`` as a module, the base of a LoRAProjection.

    It holds no tensors: ``weight`` and ``bias`` are views of the attention's own
    parameters (rows of ``in_proj_weight``, or ``q_proj_weight`` ...), so the
    attention's state-dict keys are unchanged and merging writes into its weights.
    """

    attention: nn.MultiheadAttention
    part: str
    index: int

    def __init__(self, attention: nn.MultiheadAttention, part: str) -> None:
        super().__init__()
        self.__dict__["attention"] = attention  # not a child: it is not inside this module
        self.part = part
        self.index = "qkv".index(part)

    def _rows(self, packed: Tensor) -> Tensor:
        e: int = self.attention.embed_dim
        return packed[self.index * e:(self.index + 1) * e]

    @property
    def weight(self) -> Tensor:
        mha = self.attention
        if mha.in_proj_weight is not None:
            return self._rows(mha.in_proj_weight)
        weight: Tensor = getattr(mha, f"{self.part}_proj_weight")
        return weight

    @property
    def bias(self) -> Tensor | None:
        bias = self.attention.in_proj_bias
        return None if bias is None else self._rows(bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"{self.part} of {type(self.attention).__name__}, in_features={in_features}, " \
               f"out_features={out_features}"


@register_lora_layer(AttentionProjection)
class LoRAProjection(LoRALinear):
    """LoRA on one of q, k, v of an attention: ``x W_pᵀ + b_p + s · (x Aᵀ) Bᵀ``.

    A is (r, E_in), B is (E, r); ΔW = s·B A is added to the rows of ``in_proj_weight``
    (or to ``q_proj_weight`` ...) that the part owns. The enclosing
    :class:`LoRAMultiheadAttention` computes it inside its attention.
    """

    def check_rank(self, rank: int) -> str | None:
        return _forward_problem(self.base_layer.attention)


def _forward_problem(mha: nn.Module) -> str | None:
    if type(mha).forward is nn.MultiheadAttention.forward:
        return None
    return (f"{type(mha).__name__} overrides nn.MultiheadAttention.forward; loraplug computes "
            "attention adapters inside nn.MultiheadAttention's own attention, which would "
            "bypass that forward. Register a LoRA layer for this class "
            "(loraplug.register_lora_layer), or exclude it.")


@register_lora_layer(nn.MultiheadAttention)
class LoRAMultiheadAttention(LoRALinear):
    """LoRA around an ``nn.MultiheadAttention``: in_proj, q, k, v and out_proj adapters.

    See the module docstring for the math. The layer's own adapters are PEFT's in_proj
    adapter, A (r, E) and B (3E, r), a low-rank update of ``in_proj_weight``; the parts
    are children: ``q``, ``k``, ``v`` (:class:`LoRAProjection`) and ``out_proj``
    (:class:`LoRALinear`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
        >>> lp.inject_lora(model, target=["0.q", "0.v"], rank=2)
        ['0.q', '0.v']
        >>> lp.inject_lora(model, target="0", rank=2, name="whole")  # PEFT's layout
        ['0', '0.out_proj']
        >>> model[0].lora_B["whole"].shape, model[0].q.lora_B["default"].shape
        (torch.Size([24, 2]), torch.Size([8, 2]))
        >>> x = torch.randn(1, 5, 8)
        >>> model[0](x, x, x)[0].shape
        torch.Size([1, 5, 8])
    """

    embed_dim: int
    #: PEFT (0.21) adds the out_proj adapter twice: its MultiheadAttention layer folds
    #: ΔW_out into out_proj.weight, then has out_proj fold it again, in its forward and
    #: when merging. PEFT's files therefore hold a B_out that acts doubled; loraplug writes
    #: B_out / 2 and reads 2 · B_out there, so outputs agree with PEFT's both ways.
    peft_part_factors: ClassVar[dict[str, float]] = {"out_proj": 2.0}

    def configure(self, base: nn.Module) -> None:
        self.embed_dim = int(base.embed_dim)  # type: ignore[arg-type]

    @property
    def weight(self) -> Tensor:
        """What the layer's own adapters update: ``in_proj_weight`` (3E, E)."""
        params = self._parameters
        packed = params["in_proj_weight"]
        weight = packed if packed is not None else params["q_proj_weight"]
        assert weight is not None  # one of the two always exists
        return weight

    def check_rank(self, rank: int) -> str | None:
        why = _forward_problem(self.base_layer)
        if why is None and self._parameters["in_proj_weight"] is None:
            why = ("kdim or vdim differ from embed_dim, so q, k and v have separate weights and "
                   "no packed in_proj adapter exists (PEFT refuses such layers too); target "
                   "the parts instead, e.g. '<path>.q', '<path>.k', '<path>.v'.")
        return why

    # ----------------------------------------------------------- parts
    @classmethod
    def parts_of(cls, module: nn.Module) -> dict[str, nn.Module]:
        """Part name -> the module its adapter wraps (a LoRA layer once it has one)."""
        children = module._modules
        mha: nn.MultiheadAttention = module.base_layer if isinstance(module, LoRALayer) \
            else module  # type: ignore[assignment]
        found: dict[str, nn.Module] = {}
        for p in "qkv":
            found[p] = children.get(p) or AttentionProjection(mha, p)
        out_proj = children["out_proj"]
        assert out_proj is not None  # nn.MultiheadAttention always has one
        found["out_proj"] = out_proj
        return found

    @classmethod
    def implied_parts(cls, module: nn.Module) -> tuple[str, ...]:
        """Parts adapted when the attention itself is targeted (PEFT's choice)."""
        mha = module.base_layer if isinstance(module, LoRALayer) else module
        return ("out_proj",) if mha.in_proj_weight is not None else ("q", "k", "v", "out_proj")

    @classmethod
    def takes_adapter(cls, module: nn.Module) -> bool:
        """Whether targeting the attention itself gives it an in_proj adapter."""
        mha = module.base_layer if isinstance(module, LoRALayer) else module
        return mha.in_proj_weight is not None

    def attach_part(self, part: str, layer: LoRALayer) -> None:
        """Put the LoRA layer of part ``part`` in place (``out_proj`` replaces the Linear)."""
        self._modules[part] = layer

    def _term_layers(self) -> list[tuple[LoRALayer, int]]:
        # (layer, first row in the packed 3E rows) for the layer and its q, k, v children.
        e, children = self.embed_dim, self._modules
        found: list[tuple[LoRALayer, int]] = [(self, 0)]
        for i, part in enumerate("qkv"):
            child = children.get(part)
            if isinstance(child, LoRALayer):
                found.append((child, i * e))
        return found

    def _quiet(self) -> bool:
        # Nothing to add anywhere: torch's own forward (and fast path) computes the rest.
        if self._detour is not None:
            return False
        compiling = torch.compiler.is_compiling()
        children = self._modules
        for layer in (self, *(children.get(p) for p in ("q", "k", "v", "out_proj"))):
            if not isinstance(layer, LoRALayer):
                continue
            # Compiled, the gated adapters count: switching them reuses the graph.
            if (gated_adapters(layer)[0] if compiling else layer._live):
                return False
        return True

    # ----------------------------------------------------------- forward
    def forward(  # type: ignore[override]
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward`` with the live adapters; same arguments."""
        args = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if self._quiet():
            return self.base_layer(query, key, value, *args)
        if query.is_nested:
            return self._nested(query, key, value, *args)
        return _attention.forward(self, query, key, value, *args)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v from (L, N, ·) inputs: torch's ``_in_projection_packed`` plus the adapters."""
        terms = self._terms() if self._detour is None else None
        e: int = self.embed_dim
        params: dict[str, Any] = self._parameters
        bias, packed = params["in_proj_bias"], params["in_proj_weight"]
        if packed is not None and key is value:
            if query is key:  # self-attention: one GEMM for q, k and v
                proj = self._adapted(_base(query, packed, bias), query, terms, 0, 3 * e)
                # (..., 3E) -> (3, ..., E), as torch splits it
                proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2)
                proj = proj.contiguous()
                return proj[0], proj[1], proj[2]
            w_q, w_kv = packed.split([e, 2 * e])
            b_q, b_kv = (None, None) if bias is None else bias.split([e, 2 * e])
            q = self._adapted(_base(query, w_q, b_q), query, terms, 0, e)
            kv = self._adapted(_base(key, w_kv, b_kv), key, terms, e, 3 * e)
            kv = kv.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q, kv[0], kv[1]
        weights: tuple[Tensor, ...]
        if packed is not None:
            weights = packed.chunk(3)
        else:
            weights = (params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"])
        biases = (None, None, None) if bias is None else bias.chunk(3)
        q, k, v = (self._adapted(_base(x, w, b), x, terms, i * e, (i + 1) * e)
                   for i, (x, w, b) in enumerate(zip((query, key, value), weights, biases)))
        return q, k, v

    def out_projection(self, attn: Tensor, tgt_len: int, bsz: int) -> Tensor:
        """``out_proj`` of the attention (L·N, E) as (L, N, E)."""
        out_proj: nn.Module = self._modules["out_proj"]  # type: ignore[assignment]
        if self._detour is None:
            return out_proj(attn).view(tgt_len, bsz, -1)
        # adapter_per_sample: every LoRA layer sees the rows of the batch first.
        return out_proj(attn.view(tgt_len, bsz, -1).transpose(0, 1)).transpose(0, 1)

    def _terms(self) -> list[Term]:
        terms: list[Term] = []
        compiling = torch.compiler.is_compiling()
        for layer, lo in self._term_layers():
            # Under torch.compile, gate tensors instead of floats (see _compile.py).
            names, scales = gated_adapters(layer) if compiling else (layer._live, layer.scaling)
            for name in names:
                a, b = layer._adapter(name)
                drop = layer.lora_dropout[name] if layer.training and layer.dropout[name] else None
                terms.append((lo, lo + b.shape[0], a, b, scales[name], drop))
        return terms

    def _adapted(self, out: Tensor, x: Tensor, terms: list[Term] | None, lo: int,
                 hi: int) -> Tensor:
        if terms is None:
            return self._routed(out, x, lo, hi)
        return add_terms(out, x, terms, lo, hi)

    def _routed(self, out: Tensor, x: Tensor, lo: int, hi: int) -> Tensor:
        # adapter_per_sample: each row of the batch (x is (L, N, ·)) through its adapter.
        rows = x.transpose(0, 1)
        for layer, t0 in self._term_layers():
            route = layer._detour  # a Route inside adapter_per_sample
            t1 = t0 + layer.weight.shape[0]
            if route is None or t1 <= lo or hi <= t0:
                continue
            branch = route.branch(layer, rows)  # type: ignore[attr-defined]  # (N, L, t1 - t0)
            if branch is None:
                continue
            r0, r1 = max(lo, t0), min(hi, t1)
            piece = branch[..., r0 - t0:r1 - t0].transpose(0, 1)
            out = out + F.pad(piece, (r0 - lo, hi - r1))
        return out

    def _nested(self, query: Tensor, key: Tensor, value: Tensor,
                *args: Any) -> tuple[Tensor, Tensor | None]:
        # nn.TransformerEncoder hands nested tensors (one length per sequence) to its layers;
        # compute on the padded batch with the padding masked, and nest the result again.
        if not (query is key is value and self.base_layer.batch_first) \
                or args[0] is not None or args[2] is not None:
            raise RuntimeError(
                "a nested-tensor input to nn.MultiheadAttention needs self-attention "
                "(query is key is value), batch_first=True and no masks, as torch's own fast "
                "path does; pass a padded tensor with key_padding_mask instead.")
        lengths = [t.shape[0] for t in query.unbind()]
        padded = query.to_padded_tensor(0.0)  # (N, L_max, E)
        positions = torch.arange(padded.shape[1], device=padded.device)
        padding = positions[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
        out, weights = _attention.forward(self, padded, padded, padded, padding, *args[1:])
        rows = [out[i, :n] for i, n in enumerate(lengths)]
        return torch.nested.as_nested_tensor(rows, layout=query.layout), weights


def _base(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x Wᵀ + b`` on a contiguous copy of a sequence-first view, as one GEMM.

    For such a strided input torch's ``F.linear`` copies it and runs one GEMM when the
    weight requires grad, but for a frozen weight (as injection leaves it) a batched
    matmul per position, twice as slow on CPU. Copying first keeps the GEMM, and gives
    the result torch computes for the trainable weight, before injection.
    """
    return F.linear(x.contiguous(), weight, bias)


def _down(x: Tensor, a: Tensor) -> Tensor:
    """``x Aᵀ``; on a sequence-first view of a batch-first tensor, without copying x."""
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return F.linear(x.transpose(0, 1), a).transpose(0, 1)
    return F.linear(x, a)


def add_terms(out: Tensor, x: Tensor, terms: list[Term], lo: int, hi: int) -> Tensor:
    """``out + Σ s · (x Aᵀ) B[rows]ᵀ`` over the terms that meet rows [lo, hi).

    ``out`` (..., hi - lo) holds rows lo..hi of the packed projection; a term adds its B
    rows that fall in that range to the matching columns. Several terms become one GEMM:
    their A stacked, their B placed side by side, zero outside their rows.
    """
    hits = [(max(lo, t0), min(hi, t1), t0, a, b, s, drop)
            for t0, t1, a, b, s, drop in terms if t0 < hi and lo < t1]
    if not hits:
        return out
    if len(hits) == 1:
        r0, r1, t0, a, b, s, drop = hits[0]
        if (r0, r1) == (lo, hi):
            return add_scaled_product(out, _down(x if drop is None else drop(x), a),
                                      b[r0 - t0:r1 - t0], s)
    # (hi - lo, r) each: B's rows in their place, zeros elsewhere
    bs = [F.pad(b[r0 - t0:r1 - t0], (0, 0, r0 - lo, hi - r1)) for r0, r1, t0, _, b, _, _ in hits]
    scales = {s for *_, s, _ in hits}
    if all(drop is None for *_, drop in hits) and len(scales) == 1:
        h = _down(x, torch.cat([a for _, _, _, a, *_ in hits]))
        return add_scaled_product(out, h, torch.cat(bs, 1), scales.pop())
    hs = [_down(x if drop is None else drop(x), a) * s for _, _, _, a, _, s, drop in hits]
    return add_scaled_product(out, torch.cat(hs, -1), torch.cat(bs, 1), 1.0)
