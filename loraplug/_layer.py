"""The LoRA layer base class: forward, merge, unmerge and adapter bookkeeping, written once.

A LoRA layer wraps one base module (``nn.Linear``, ``nn.Conv2d``, ...) and computes

    y = base(x) + sum over active adapters a of  s_a · B_a A_a dropout_a(x),   s_a = alpha_a / r_a

The wrapper registers the base module's own parameters and buffers under their own
names (``weight``, ``bias``), so ``state_dict`` keys of the base model never change; the
adapters add ``lora_A.<name>`` and ``lora_B.<name>`` beside them. The original module
object is kept (unregistered) as ``base_layer`` and is handed back by ``unload``.

A layer type supplies only its shape-specific parts: ``base_forward`` (the base math),
``lora_forward`` (the low-rank branch), ``delta_weight`` (ΔW shaped like the weight) and
``adapter_shapes``; optionally ``configure``, ``check_rank``, ``max_rank`` and
``routed_lora`` (the branch with one adapter per row, for ``adapter_per_sample``). The
built-in types also fuse the branch into the base output (``_add_lora``) and ΔW into
the weight (``_add_delta``); a subclass that redefines ``lora_forward`` or
``delta_weight`` falls back to the plain versions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compile import CompiledForwardMixin
from ._errors import StateError
from ._owner_reads import read_in_forward

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ΔW is computed in: float32 for half-precision weights, else the weight's own."""
    return torch.float32 if dtype in _HALF else dtype


def add_scaled_product(out: Tensor, h: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``out + scaling · h bᵀ`` over the last dimension, as one GEMM that accumulates.

    Shapes: out (..., d), h (..., r), b (d, r). ``out`` must be a fresh result of the
    base computation, not saved for backward: it is written in place where autograd
    does not record, or does not need a view for it. Scaling is the GEMM's ``alpha``,
    so neither the product nor the scaling needs an output-sized temporary.
    """
    if out.dtype == h.dtype == b.dtype and type(scaling) is float and out.is_contiguous():
        flat = out if out.dim() == 2 else out.view(-1, out.shape[-1])
        h = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled() and (out.dim() != 2 or out._is_view()):
            # Autograd would turn an in-place write into a view into two full copies of
            # the gradient (CopySlices); a new result costs one copy of the output.
            return torch.addmm(flat, h, b.t(), alpha=scaling).view(out.shape)
        flat.addmm_(h, b.t(), alpha=scaling)
        return out
    # Mixed dtypes (autocast) or an unusual layout: the plain out-of-place sum.
    return out + F.linear(h * scaling, b)


class LoRALayer(CompiledForwardMixin, nn.Module):
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
    """

    #: Methods of the base type whose override in a subclass changes the math; when a
    #: wrapped module overrides any of them, the layer computes through its weight.
    forward_methods: ClassVar[tuple[str, ...]] = ("forward",)
    #: Which of A, B starts at zero so that a fresh adapter adds exactly nothing.
    zero_init: ClassVar[str] = "B"
    #: Whether dropout on the input of the low-rank branch is meaningful (not for ids).
    supports_dropout: ClassVar[bool] = True
    #: How PEFT's files name this layer's tensors: "weight" (``lora_A.weight``) or
    #: "embedding" (``lora_embedding_A``).
    peft_key_style: ClassVar[str] = "weight"
    #: Set by ``adapter_per_sample`` while each row of a batch picks its own adapter.
    _route = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A class that redefines the branch or ΔW must not inherit a parent's fused
        # versions of them: they would compute the parent's math. Fall back to the plain
        # ones (routed_lora has none: adapter_per_sample then refuses the layer).
        fused = {"lora_forward": ("_add_lora", "routed_lora"), "delta_weight": ("_add_delta",)}
        for plain, derived in fused.items():
            if plain in cls.__dict__:
                for name in derived:
                    if name not in cls.__dict__:
                        setattr(cls, name, getattr(LoRALayer, name))

    def __init__(self, base: nn.Module, registered_type: type[nn.Module]) -> None:
        super().__init__()
        self.__dict__["base_layer"] = base
        self.registered_type = registered_type
        # Adopt the base module's tensors and children under their own names: keys unchanged.
        self._parameters.update(base._parameters)
        self._buffers.update(base._buffers)
        self._non_persistent_buffers_set |= base._non_persistent_buffers_set
        self._modules.update(base._modules)
        self.training = base.training
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False
        self._live: tuple[str, ...] = ()
        self.through_weight = any(
            getattr(type(base), m, None) is not getattr(registered_type, m, None)
            for m in self.forward_methods
        )
        self.configure(base)

    # ----------------------------------------------------------- per-type hooks
    def configure(self, base: nn.Module) -> None:
        """Read the base module's geometry once (stride, padding, ...)."""

    def base_forward(self, x: Tensor) -> Tensor:
        """The registered base type's own math, reading ``self.weight``."""
        raise NotImplementedError

    def lora_forward(self, x: Tensor, name: str) -> Tensor:
        """The low-rank branch ``s · B A x`` of adapter ``name``, shaped like the output."""
        raise NotImplementedError

    def routed_lora(self, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                    slot: Tensor | None) -> Tensor:
        """The low-rank branch with a different adapter for each row (first dimension).

        Row i computes ``scale[j] · B[j] A[j] x[i]`` with ``j = slot[i]`` (``j = i`` when
        ``slot`` is None), in one batched computation over the stacked adapters ``a``
        (n, *A shape) and ``b`` (n, *B shape). Used by ``adapter_per_sample``.
        """
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """``s · ΔW`` of adapter ``name``, shaped like ``weight``, in :func:`compute_dtype`."""
        raise NotImplementedError

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank ``rank``."""
        raise NotImplementedError

    def max_rank(self) -> int:
        """The largest rank ΔW can have; a larger adapter rank only wastes parameters."""
        return min(self.weight.shape[0], self.weight[0].numel())

    def check_rank(self, rank: int) -> str | None:
        """Why ``rank`` cannot work on this layer, or ``None`` when it can."""
        return None

    # ----------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # adapter state as tensors: see _compile.py
            return self._forward_compiled(x)
        if self.through_weight:
            return self._forward_through_weight(x)
        if self._route is not None:
            return self._route.forward(self, x)
        out = self.base_forward(x)
        for name in self._live:
            # Dropout only where it changes something: no module call in eval or at p = 0.
            if self.training and self.dropout[name]:
                out = self._add_lora(out, self.lora_dropout[name](x), name)
            else:
                out = self._add_lora(out, x, name)
        return out

    # The hot path reads tensors straight from the registries: nn.Module.__getattr__ costs
    # about a microsecond per attribute, as much as a small matmul.
    def _tensor(self, key: str) -> Tensor | None:
        """``self.<key>``: a registered parameter looked up directly, else the attribute."""
        params = self._parameters
        return params[key] if key in params else getattr(self, key)

    def _adapter(self, name: str) -> tuple[Tensor, Tensor]:
        """``(lora_A[name], lora_B[name])``, looked up directly."""
        return (self._modules["lora_A"]._parameters[name],
                self._modules["lora_B"]._parameters[name])

    def _add_lora(self, out: Tensor, x: Tensor, name: str) -> Tensor:
        """``out + lora_forward(x, name)``; a layer type may add into ``out`` in place.

        ``out`` is the tensor ``base_forward`` just returned (fresh, not saved for
        backward), so writing into it is safe.
        """
        return out + self.lora_forward(x, name)

    def _forward_through_weight(self, x: Tensor) -> Tensor:
        # The wrapped module's own forward differs from the registered type's, so the
        # low-rank branch cannot be added to its output; run that forward on W + ΔW.
        tensors = {k: v for k, v in self._parameters.items() if v is not None}
        tensors.update((k, v) for k, v in self._buffers.items() if v is not None)
        if self._live:
            tensors["weight"] = self.adapted_weight()
        return torch.func.functional_call(self.base_layer, tensors, (x,))

    def adapted_weight(self) -> Tensor:
        """``W + Σ s·ΔW`` over the live adapters, differentiable in A and B."""
        weight = self._tensor("weight")
        if not self._live:
            return weight
        delta = sum(self.delta_weight(n) for n in self._live)
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    # ----------------------------------------------------------- adapters
    def new_adapter(self, rank: int, init: str) -> tuple[Tensor, Tensor]:
        """Freshly initialised (A, B) for rank ``rank``; one of them is zero.

        ``init="kaiming"``: the non-zero side is Kaiming-uniform with a = √5 (PEFT's and
        loralib's default); ``"gaussian"``: normal with std 1/r. Embeddings start with
        A = 0 and B ~ N(0, 1), as PEFT does.
        """
        weight = self.weight
        shape_a, shape_b = self.adapter_shapes(rank)
        a = torch.empty(shape_a, device=weight.device, dtype=torch.float32)
        b = torch.empty(shape_b, device=weight.device, dtype=torch.float32)
        zero, other = (b, a) if self.zero_init == "B" else (a, b)
        nn.init.zeros_(zero)
        if self.zero_init == "A":
            nn.init.normal_(other)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(other, a=math.sqrt(5))
        else:
            nn.init.normal_(other, std=1.0 / rank)
        return a.to(weight.dtype), b.to(weight.dtype)

    def add_adapter(
        self, name: str, a: Tensor, b: Tensor, *, alpha: float, dropout: float,
        use_rslora: bool = False,
    ) -> None:
        """Attach adapter ``name`` with tensors ``a``, ``b`` (already validated).

        The scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        """
        rank = a.shape[0]
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        p = dropout if self.supports_dropout else 0.0
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.rank[name] = rank
        self.use_rslora[name] = bool(use_rslora)
        self.dropout[name] = p
        self.set_scale(name, alpha)
        self._refresh()

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (the layer must not have it merged)."""
        if name in self.merged_adapters:
            raise StateError(
                f"adapter {name!r} is merged into this layer's weight; call unmerge() first."
            )
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        for store in (self.rank, self.alpha, self.scaling, self.use_rslora, self.dropout):
            del store[name]
        self._refresh()

    def set_scale(self, name: str, alpha: float) -> None:
        """Change adapter ``name``'s alpha (and so its scaling ``alpha / r``)."""
        if name in self.merged_adapters:
            raise StateError(f"adapter {name!r} is merged; call unmerge() before changing alpha.")
        self.alpha[name] = float(alpha)
        rank = self.rank[name]
        self.scaling[name] = float(alpha) / (math.sqrt(rank) if self.use_rslora[name] else rank)
        self._sync_compiled_scales()

    def set_active(self, names: Iterable[str]) -> None:
        """Ask for ``names`` to be computed; names this layer lacks are ignored."""
        if self.merged_adapters:
            raise StateError(
                f"this layer has {list(self.merged_adapters)} merged; unmerge before "
                "switching adapters."
            )
        self.active_adapters = tuple(names)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        """Compute the base module alone while ``disabled`` is true."""
        if disabled and self.merged_adapters:
            raise StateError(
                f"this layer has {list(self.merged_adapters)} merged into its weight; "
                "unmerge before disabling adapters."
            )
        self.adapters_disabled = bool(disabled)
        self._refresh()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of the adapters this layer carries, in the order they were added."""
        return tuple(self.rank)

    @property
    def merged(self) -> bool:
        """Whether any adapter is folded into ``weight``."""
        return bool(self.merged_adapters)

    def _refresh(self) -> None:
        # The adapters forward must compute, resolved once here instead of every call.
        if self.merged_adapters or self.adapters_disabled:
            self._live = ()
        else:
            self._live = tuple(n for n in self.active_adapters if n in self.rank)
        self._sync_compiled_scales()

    # ----------------------------------------------------------- merge
    def _live_or_active(self) -> tuple[str, ...]:
        return tuple(n for n in self.active_adapters if n in self.rank)

    @torch.no_grad()
    def merged_weight(self, names: Iterable[str] | None = None, *, sign: int = 1) -> Tensor:
        """``W + sign · Σ s·ΔW`` over ``names`` (default: the active adapters), not committed.

        ΔW is summed in float32 for float16/bfloat16 weights and cast once at the end.
        """
        names = self._live_or_active() if names is None else tuple(names)
        weight = self.weight
        acc = weight.to(compute_dtype(weight.dtype), copy=True)
        for name in names:
            self._add_delta(acc, name, sign)
        return acc.to(weight.dtype)

    def _add_delta(self, target: Tensor, name: str, sign: int) -> None:
        """``target += sign · s·ΔW`` of adapter ``name``; ``target`` shaped like ``weight``.

        Layer types fuse this into one GEMM that accumulates into ``target``.
        """
        target.add_(self.delta_weight(name).to(target.dtype), alpha=sign)

    @torch.no_grad()
    def _fold(self, names: tuple[str, ...], sign: int) -> None:
        # Merge or unmerge: in place when ΔW is computed in the weight's own dtype, which
        # reads and writes the weight once; half weights go through a float32 copy.
        weight = self.weight
        if compute_dtype(weight.dtype) == weight.dtype:
            for name in names:
                self._add_delta(weight, name, sign)
        else:
            weight.copy_(self.merged_weight(names, sign=sign))

    @torch.no_grad()
    def _commit(self, new_weight: Tensor, merged: tuple[str, ...]) -> None:
        self.weight.copy_(new_weight)
        self.merged_adapters = merged
        self._refresh()

    def merge(self, *, safe: bool = False) -> None:
        """Fold the active adapters into ``weight`` in place; a no-op when already merged.

        While merged, ``forward`` costs exactly what the base module costs.

        Args:
            safe: check that the merged weight is finite before writing it.

        Raises:
            StateError: adapters are disabled, or ``safe`` is set and the merged weight
                has NaN or inf; the weight is left as it was.
        """
        if self.adapters_disabled:
            raise StateError(
                "adapters are disabled on this layer (inside disable_adapters); merge outside "
                "that block."
            )
        if self.merged_adapters:
            return
        names = self._live_or_active()
        if not names:
            return
        if not safe:
            self._fold(names, 1)
            self.merged_adapters = names
            self._refresh()
            return
        new = self.merged_weight(names)
        if not torch.isfinite(new).all():
            raise StateError(
                f"merging {list(names)} gives a weight with NaN or inf values; the weight was "
                "left unmerged. Check the adapter tensors (torch.isfinite) before merging."
            )
        self._commit(new, names)

    def unmerge(self) -> None:
        """Take the merged adapters out of ``weight`` again; a no-op when nothing is merged."""
        if not self.merged_adapters:
            return
        self._fold(self.merged_adapters, -1)
        self.merged_adapters = ()
        self._refresh()

    # ----------------------------------------------------------- nn.Module plumbing
    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self.sync_base()
        self._sync_compiled_scales()  # to_empty() leaves buffers uninitialised
        return self

    def sync_base(self) -> None:
        """Point the wrapped module at this layer's current tensors (after ``.to()`` etc.)."""
        base = self.__dict__["base_layer"]
        for key in base._parameters:
            base._parameters[key] = self._parameters[key]
        for key in base._buffers:
            base._buffers[key] = self._buffers[key]
        base.training = self.training

    def train(self, mode: bool = True) -> LoRALayer:
        super().train(mode)
        self.__dict__["base_layer"].train(mode)
        return self

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        # A module that reads this layer's weight in its forward instead of calling the
        # layer sees the adapted weight (see _owner_reads.py).
        if name == "weight" and read_in_forward() and self.__dict__.get("_live"):
            return self.adapted_weight()
        # Attributes of the base module (in_features, kernel_size, ...) read through.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={self.rank[n]} alpha={self.alpha[n]:g}" for n in self.adapter_names
        )
        state = " merged" if self.merged else ""
        return f"{self.base_layer!r} [{adapters}]{state}"
