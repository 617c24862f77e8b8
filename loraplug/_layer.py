"""The LoRA layer base class: the layer-type contract, forward, merge and unmerge, written once.

A LoRA layer wraps one base module (``nn.Linear``, ``nn.Conv2d``, ...) and computes

    y = base(x) + sum over active adapters a of  s_a · B_a A_a dropout_a(x),   s_a = alpha_a / r_a

The wrapper registers the base module's own parameters and buffers under their own
names (``weight``, ``bias``), so ``state_dict`` keys of the base model never change; the
adapters add ``lora_A.<name>`` and ``lora_B.<name>`` beside them. The original module
object is kept (unregistered) as ``base_layer`` and is handed back by ``unload``.

A layer type supplies its shape-specific math as hooks that are handed the tensors:
``base_forward(x)``, ``adapter_shapes(r)``, ``add_lora(out, x, a, b, scale)`` (the
branch, added to the base output) and ``add_delta(target, a, b, scale)`` (ΔW, added to
a weight-shaped tensor); optionally ``configure``, ``check_rank``, ``max_rank`` and
``routed_lora``. Everything else is derived here once: the eager and the compiled
forward (one loop; the scale is a float, or a gate tensor under ``torch.compile``), the
forward through the weight, ``lora_forward`` and ``delta_weight``, merge and unmerge.
The adapters' bookkeeping is :class:`~loraplug._adapter_set.AdapterSet`'s.
docs/extending.md walks through a new layer type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from . import _variants
from ._adapter_set import AdapterSet
from ._compile import gated_adapters, sync_gates
from ._errors import StateError
from ._folds import names_to_merge, push, take_out
from ._named_forms import NamedBranch, forms_of
from ._owner_reads import ReadableWeight
from ._products import Scale, compute_dtype
from ._weights import before_loading, merge_problem, warn_training_merged


def _as_tuple(names: str | Iterable[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


class Detour(Protocol):
    """A forward that replaces the layer's own while set (see ``LoRALayer._detour``)."""

    def forward(self, layer: LoRALayer, x: Tensor) -> Tensor: ...


class LoRALayer(ReadableWeight, AdapterSet):
    """Base class of every LoRA layer: a base module plus named low-rank adapters.

    ``y = base(x) + Σ_a s_a · B_a A_a dropout_a(x)`` over the active adapters a, with
    ``s_a = alpha_a / r_a``; merged, ``y = base(x)`` on ``W + Σ_a s_a ΔW_a``. Subclasses
    implement the per-type hooks below for one base type and register themselves with
    :func:`loraplug.register_lora_layer`.

    Attributes:
        base_layer: the wrapped module (not registered: its tensors are registered on
            this layer under their own names).
        lora_A: adapter name → A, shaped ``adapter_shapes(r)[0]`` (Linear: ``(r, in)``).
        lora_B: adapter name → B, shaped ``adapter_shapes(r)[1]`` (Linear: ``(out, r)``).
        rank, alpha, scaling: adapter name → r, alpha, alpha / r (alpha / √r with
            ``use_rslora``).
        active_adapters: the names the model asked for (a layer computes those it has).
        merged_adapters: the adapters folded into ``weight`` right now, in order.
        forward_differs: whether the wrapped module's ``forward`` differs from the
            registered type's, so only that forward run on ``W + ΔW`` is right.
        through_weight: whether the forward runs ``W + ΔW`` through the base math
            instead of adding the branch to ``base_forward``: when ``forward_differs``,
            or where a layer type finds it cheaper (grouped convolutions).
    """

    #: Methods of the base type whose override in a subclass changes the math; when a
    #: wrapped module overrides any of them, the layer computes through its weight.
    forward_methods: ClassVar[tuple[str, ...]] = ("forward",)
    #: Which of A, B starts at zero so that a fresh adapter adds exactly nothing.
    zero_init: ClassVar[str] = "B"
    #: Whether ΔW is (B A)ᵀ rather than B A (Embedding: W is (V, d), B A is (d, V)).
    transposed_delta: ClassVar[bool] = False
    #: Whether dropout on the input of the low-rank branch is meaningful (not for ids).
    supports_dropout: ClassVar[bool] = True
    #: How PEFT's files name this layer's tensors: "weight" (``lora_A.weight``) or
    #: "embedding" (``lora_embedding_A``).
    peft_key_style: ClassVar[str] = "weight"
    #: Why this layer type cannot fold its adapters into a weight, or None when it can.
    #: merge, unload(merge=True) and save_merged raise a StateError with this reason.
    merge_refusal: ClassVar[str | None] = None

    def __init__(self, base: nn.Module, registered_type: type[nn.Module]) -> None:
        super().__init__()
        self.adopt(base)  # keys unchanged; its children ahead of the adapter registries
        self.registered_type = registered_type
        weight = self._tensor("weight")
        # The gates the compiled forward reads (see _compile.py); not saved.
        self.register_buffer("_lora_scales", torch.zeros(0, device=weight.device),
                             persistent=False)
        self._forms = forms_of(type(self))  # tensor hooks or named forms: _named_forms.py
        # None on the usual path. Else the forward that replaces this layer's: a Route
        # inside adapter_per_sample, or NamedBranch for a layer type of named forms.
        self._detour: Detour | None = NamedBranch() if self._forms.named_branch else None
        # Adapters with a DoRA magnitude or a bias on B: computed by _variants.
        self._extended: frozenset[str] = frozenset()
        self.forward_differs = any(
            getattr(type(base), m, None) is not getattr(registered_type, m, None)
            for m in self.forward_methods
        )
        self.through_weight = self.forward_differs
        self.configure(base)

    # ----------------------------------------------------------- per-type hooks
    def configure(self, base: nn.Module) -> None:
        """Read the base module's geometry once (stride, padding, ...)."""

    def base_forward(self, x: Tensor) -> Tensor:
        """The registered base type's own math, reading ``self.weight``."""
        raise NotImplementedError

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank ``rank``."""
        raise NotImplementedError

    def add_lora(self, out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Scale) -> Tensor:
        """``out + scale · B A x``: one adapter's branch added to the output ``out``.

        ``out`` is what ``base_forward(x)`` returned, plus the branches of the adapters
        before this one: a fresh tensor, not saved for backward, so the sum may be written
        into it in place (see :func:`loraplug._products.add_scaled_product`). ``scale`` is
        a float in eager mode and a 0-d tensor under ``torch.compile``.
        """
        raise NotImplementedError

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        """``target += scale · ΔW(a, b)`` in place; ``target`` is shaped like ``weight``.

        ``target`` is in :func:`compute_dtype` of the weight and ``a``, ``b`` may not be:
        cast them (:func:`loraplug._products.add_matmul` does). ``scale`` is negative to
        unmerge, and a 0-d tensor under ``torch.compile`` (forward through the weight).
        """
        raise NotImplementedError

    def routed_lora(self, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                    slot: Tensor | None) -> Tensor:
        """The low-rank branch with a different adapter for each row (first dimension).

        Row i computes ``scale[j] · B[j] A[j] x[i]`` with ``j = slot[i]`` (``j = i`` when
        ``slot`` is None), in one batched computation over the stacked adapters ``a``
        (n, *A shape) and ``b`` (n, *B shape). Used by ``adapter_per_sample``; a layer
        type without it is refused there.
        """
        raise NotImplementedError

    def channel_shape(self, channels: int) -> tuple[int, ...] | None:
        """The shape in which a per-output-channel vector broadcasts over the output.

        ``(C,)`` for a Linear (channels last), ``(1, C, 1, 1)`` for a Conv2d; DoRA's
        magnitude and B's bias are stored in this shape. ``None`` (the default): the
        layer type has no such channels, and refuses DoRA and ``lora_bias``.
        """
        return None

    def max_rank(self) -> int:
        """The largest rank ΔW can have; a larger adapter rank only wastes parameters."""
        return min(self.weight.shape[0], self.weight[0].numel())

    def file_tensors(self, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor] | None:
        """A and B read from a file for rank ``rank``, in a layout this layer computes;
        ``None`` when their shapes fit none (a layer type may convert other layouts)."""
        want_a, want_b = self.adapter_shapes(rank)
        fits = (tuple(a.shape), tuple(b.shape)) == (tuple(want_a), tuple(want_b))
        return (a, b) if fits else None

    def check_rank(self, rank: int) -> str | None:
        """Why ``rank`` cannot work on this layer, or ``None`` when it can."""
        return None

    def delta_blocks(self, delta: Tensor) -> Tensor | None:
        """``delta`` (shaped like ``weight``) as a view (g, rows, cols) of g products.

        Block k is ``s · B_k A_k`` with ``A_k = A.reshape(g, r/g, cols)[k]`` and
        ``B_k = B.reshape(g, rows, r/g)[k]``: what concatenating adapters and
        refactoring a sum of them by SVD (``combine_adapters``) rely on. None, the
        default, when ΔW has no such form (those methods are then refused).
        """
        return None

    # ----------------------------------------------------------- derived forms
    def lora_forward(self, x: Tensor, name: str) -> Tensor:
        """The branch ``s · B A x`` of adapter ``name`` alone, shaped like the output.

        Derived from ``add_lora``; it runs ``base_forward`` for the output's shape (the
        forward itself calls ``add_lora`` on the base output).
        """
        a, b = self._adapter(name)
        zeros = torch.zeros_like(self.base_forward(x))
        return self.add_lora(zeros, x, a, b, self.scaling[name])

    def delta_weight(self, name: str) -> Tensor:
        """``s · ΔW`` of adapter ``name``, shaped like ``weight``, in :func:`compute_dtype`."""
        weight = self._tensor("weight")
        delta = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device)
        a, b = self._adapter(name)
        self.add_delta(delta, a, b, self.scaling[name])
        return delta

    # ----------------------------------------------------------- forward
    def _forward(self, x: Tensor) -> Tensor:
        if self._detour is not None:
            return self._detour.forward(self, x)
        scales: Mapping[str, Scale]
        if torch.compiler.is_compiling():  # adapter state as tensors: see _compile.py
            names, scales = gated_adapters(self)
        else:
            names, scales = self._live, self.scaling
        if not names and self.merged_adapters and self.training:
            warn_training_merged(self)  # off the hot path: only a merged layer gets here
        if self.through_weight:
            return self._forward_through_weight(x, names, scales)
        if self._extended and self._extended.intersection(names):
            return _variants.forward(self, x, names, scales)
        out = self.base_forward(x)
        if names:
            registry: dict[str, Any] = self._modules
            lora_a, lora_b = registry["lora_A"]._parameters, registry["lora_B"]._parameters
            for name in names:
                # Dropout only where it changes something: no module call in eval or at p = 0.
                if self.training and self.dropout[name]:
                    out = self.add_lora(out, self.lora_dropout[name](x), lora_a[name],
                                        lora_b[name], scales[name])
                else:
                    out = self.add_lora(out, x, lora_a[name], lora_b[name], scales[name])
        return out

    def _forward_through_weight(self, x: Tensor, names: tuple[str, ...],
                                scales: Mapping[str, Scale]) -> Tensor:
        # The wrapped module's own forward differs from the registered type's, so the
        # low-rank branch cannot be added to its output; run that forward on W + ΔW.
        base = self.__dict__["base_layer"]
        tensors: dict[str, Tensor | None] = {k: self._parameters[k] for k in base._parameters}
        tensors.update((k, self._buffers[k]) for k in base._buffers)
        if names:
            tensors["weight"] = self._adapted_weight(names, scales)
            tensors["bias"] = self._adapted_bias(names, scales)
        return torch.func.functional_call(
            base, {k: v for k, v in tensors.items() if v is not None}, (x,))

    def _adapted_bias(self, names: tuple[str, ...], scales: Mapping[str, Scale]) -> Tensor | None:
        # The bias that goes with _adapted_weight: the base's, plus s·b_B of B's biases.
        if self._extended:
            return _variants.adapted_bias(self, names, scales)
        bias: Tensor | None = self._parameters.get("bias")
        return bias

    # The hot path reads tensors straight from the registries: nn.Module.__getattr__ costs
    # about a microsecond per attribute, as much as a small matmul.
    def _tensor(self, key: str) -> Any:
        """``self.<key>``: a registered parameter looked up directly, else the attribute."""
        params = self._parameters
        return params[key] if key in params else getattr(self, key)

    def _adapter(self, name: str) -> tuple[Tensor, Tensor]:
        """``(lora_A[name], lora_B[name])``, looked up directly."""
        registry: dict[str, Any] = self._modules
        return registry["lora_A"]._parameters[name], registry["lora_B"]._parameters[name]

    def new_adapter(self, rank: int, init: str) -> tuple[Tensor, Tensor]:
        """Fresh (A, B) of rank ``rank``, one of them zero: ``init`` "kaiming" (A
        Kaiming-uniform, a = √5) or "gaussian" (A ~ N(0, 1/r)); embeddings A = 0, B ~ N(0, 1)."""
        from ._inits import zero_start  # the initialisations build on the layer

        return zero_start(self, rank, init)

    # ----------------------------------------------------------- merge
    def _adapted_weight(self, names: Iterable[str], scales: Mapping[str, Scale],
                        sign: int = 1) -> Tensor:
        # W + sign · Σ s·ΔW, accumulated in compute_dtype and cast back once.
        weight = self._tensor("weight")
        acc = weight.to(compute_dtype(weight.dtype), copy=True)
        self._accumulate(acc, names, scales, sign)
        return acc.to(weight.dtype)

    def _accumulate(self, target: Tensor, names: Iterable[str], scales: Mapping[str, Scale],
                    sign: int) -> None:
        # target += sign · Σ s·ΔW over names, through add_delta (or delta_weight, for a
        # layer type of named forms).
        if self._extended and self._extended.intersection(names):
            _variants.fold(self, target, tuple(names), scales, sign)
            return
        if self._forms.named_delta:
            for name in names:
                target.add_(self.delta_weight(name).to(target.dtype), alpha=sign)
            return
        for name in names:
            a, b = self._adapter(name)
            self.add_delta(target, a, b, scales[name] if sign == 1 else -scales[name])

    @torch.no_grad()
    def merged_weight(self, names: Iterable[str] | None = None, *, sign: int = 1) -> Tensor:
        """``W + sign · Σ s·ΔW`` over ``names`` (default: :attr:`held_active`), not written.

        ΔW is summed in float32 for float16/bfloat16 weights and cast once at the end.
        """
        names = self.held_active if names is None else tuple(names)
        return self._adapted_weight(names, self.scaling, sign)

    def merge(self, names: str | Iterable[str] | None = None, *, safe: bool = False,
              exact: bool = True) -> None:
        """Fold adapters into ``weight`` in place: the active ones, or ``names``.

        Adapters already merged are skipped, so ΔW is never added twice. While every
        active adapter is merged, ``forward`` costs exactly what the base module costs.
        See :func:`loraplug.merge` for ``exact``; ``safe`` is kept for compatibility
        (every merge is checked).

        A parametrized weight (``torch.nn.utils.parametrize``) is written through its
        parametrization and unmerged by subtracting, not bit for bit.

        Raises:
            StateError: the layer type cannot merge (:attr:`merge_refusal`), the weight
                cannot take it (computed by a hook, or parametrized by something that
                cannot hold it), adapters are disabled, or the merged weight would have
                NaN or inf entries; the weight is left as it was.
        """
        why = merge_problem(self)  # merge_refusal, or a weight computed by a hook
        if why is not None:
            raise StateError(f"a {type(self).__name__} cannot be merged: {why}")
        if self.adapters_disabled:
            raise StateError(
                "adapters are disabled on this layer (inside disable_adapters); merge outside "
                "that block."
            )
        adding = names_to_merge(self, None if names is None else _as_tuple(names))
        if adding:
            push(self, adding, exact=exact)

    def unmerge(self, names: str | Iterable[str] | None = None) -> None:
        """Take merged adapters out of ``weight``: all, or ``names``; exactly when merged so.

        See :func:`loraplug.unmerge`.
        """
        take_out(self, self.merged_adapters if names is None else _as_tuple(names))

    # ----------------------------------------------------------- nn.Module plumbing
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoRALayer:
        super()._apply(fn, recurse)  # and sync_base
        sync_gates(self)  # to_empty() leaves buffers uninitialised
        return self

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        before_loading(self, state_dict, prefix)  # a merged flag that stays true
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={self.rank[n]} alpha={self.alpha[n]:g}" for n in self.adapter_names
        )
        state = " merged" if self.merged else ""
        return f"{self.base_layer!r} [{adapters}]{state}"

