"""LoRA for Linear layers whose weight is stored quantized (QLoRA, Dettmers et al. 2023).

    y = base(x) + s · (x Aᵀ) Bᵀ,    ΔW = s · B A

``base(x)`` is the quantized layer's own forward (bitsandbytes' 4-bit or 8-bit matmul,
torchao's tensor subclass), untouched. A (r, in) and B (out, r) are shaped from the
logical (out, in), never from the packed storage, and are never quantized: float32 for
a packed weight (bitsandbytes, as PEFT makes them), the weight's logical dtype for a
torchao tensor subclass. The branch is computed in their dtype (x is cast to it) and
its result cast to the base output's dtype before the sum, as PEFT does. Their
gradients never touch the quantized weight.

Merging is opt-in: ``W + ΔW`` does not lie on the quantized grid, so a merge has to round
it (requantize), which moves the base by more than the adapter. ``merge(requantize=True)``
does it and records the largest change beyond ΔW (``requantization_error``); ``unmerge``
puts the stored weight back bit for bit (the layer keeps it while merged).
``merged_weight`` (and so ``save_merged``) gives the dense ``dequantize(W) + ΔW`` without
touching the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import ConfigError, StateError
from ._linear import LoRALinear
from ._products import Scale, add_scaled_product, compute_dtype
from ._quantized import QuantizedWeight, weight_format
from ._weights import before_loading


class LoRAQuantizedLinear(LoRALinear):
    """LoRA around a Linear layer with a quantized weight: ``base(x) + (alpha/r) · B A x``.

    The base is called as it is (its forward is never replaced), so subclasses of a
    quantized layer compute exactly what they computed before.

    Attributes:
        weight_format: how the weight is stored (read, rewritten, measured).
        requantization_error: ``max |W_new − (W + ΔW)|`` of the last requantizing merge.
    """

    # The base module's own forward is what runs, whatever its class: never recompute it.
    forward_methods: ClassVar[tuple[str, ...]] = ()
    reads_see_delta = False  # other modules read the stored (quantized) weight

    def configure(self, base: nn.Module) -> None:
        fmt = weight_format(base)
        if fmt is None:
            raise ConfigError(
                f"{type(base).__name__} has a weight of type {type(base.weight).__name__}, "
                "which loraplug does not read as a quantized weight; quantize the layer first "
                "(bitsandbytes quantizes when the layer is moved to a device)."
            )
        self.weight_format: QuantizedWeight = fmt
        self._kept: object = None  # the stored weight before a requantizing merge
        self.requantization_error: float | None = None  # of the last requantizing merge

    # ----------------------------------------------------------- shapes and math
    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_features, in_features = self.weight_format.shape(self.base_layer)
        return (rank, in_features), (out_features, rank)

    def max_rank(self) -> int:
        return min(self.weight_format.shape(self.base_layer))

    def base_forward(self, x: Tensor) -> Tensor:
        return self.base_layer.forward(x)

    def add_lora(self, out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Scale) -> Tensor:
        # The branch in A's dtype, added to the output in the output's dtype.
        h = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)  # (..., r)
        if out.dtype == b.dtype:
            return add_scaled_product(out, h, b, scale)
        return out + F.linear(h * scale, b).to(out.dtype)

    def routed_lora(self, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                    slot: Tensor | None) -> Tensor:
        return super().routed_lora(x.to(a.dtype), a, b, scale, slot).to(x.dtype)

    def delta_weight(self, name: str) -> Tensor:
        a, b = self._adapter(name)
        delta = torch.zeros(self.weight_format.shape(self.base_layer),
                            dtype=compute_dtype(a.dtype), device=a.device)
        self.add_delta(delta, a, b, self.scaling[name])
        return delta

    # ----------------------------------------------------------- merging
    @torch.no_grad()
    def merged_weight(self, names: Iterable[str] | None = None, *, sign: int = 1) -> Tensor:
        """Dense ``dequantize(W) + sign · Σ s·ΔW`` over ``names`` (default: the active ones).

        Summed in float32 (or the dequantized dtype, if wider), returned in the dtype
        the weight dequantizes to.
        """
        names = self.held_active if names is None else tuple(names)
        weight = self.weight_format.dequantize(self.base_layer)
        acc = weight.to(compute_dtype(weight.dtype))
        self._accumulate(acc, names, self.scaling, sign)
        return acc.to(weight.dtype)

    def merge(self, names: str | Iterable[str] | None = None, *, safe: bool = False,
              exact: bool = True, requantize: bool = False) -> None:
        """Fold the active adapters into the quantized weight by requantizing; opt-in.

        ``W ← quantize(dequantize(W) + Σ s·ΔW)``. Rounding to the quantized grid
        changes the weight by more than ΔW; the largest such change,
        ``max |W_new − (W + ΔW)|``, is kept in :attr:`requantization_error`
        (``loraplug.merge(model, requantize=True)`` returns it per layer). A no-op when
        already merged or no adapter is active.

        Args:
            names: ignored beyond the active adapters: a requantized weight holds every
                active adapter or none.
            safe: kept for compatibility: the merged weight is always checked.
            exact: ignored: ``unmerge`` always restores the stored weight bit for bit.
            requantize: must be True: a plain merge is refused (see the module docstring).

        Raises:
            StateError: ``requantize`` is not set, adapters are disabled, the format
                cannot be requantized, or ``safe`` is set and the result is not finite.
        """
        if self.merged_adapters:
            return
        if not requantize:
            kind = self.weight_format.kind(self.base_layer)
            raise StateError(
                f"this layer's weight is stored quantized ({kind}); merging would round "
                "W + ΔW back to the quantized grid, which changes the base by more than the "
                "adapter. Keep the adapter unmerged, pass requantize=True to accept that (the "
                "error is returned), or write full-precision merged weights with "
                "loraplug.save_merged."
            )
        if self.adapters_disabled:
            raise StateError(
                "adapters are disabled on this layer (inside disable_adapters); merge outside "
                "that block."
            )
        if not self.held_active:
            return
        new = self.merged_weight()
        if not torch.isfinite(new).all():
            raise StateError(f"merging {list(self.held_active)} gives a weight with NaN or inf "
                             "values; the weight was left unmerged. Check the adapter tensors "
                             "(torch.isfinite) before merging.")
        self.commit_merge(new)

    @torch.no_grad()
    def commit_merge(self, weight: Tensor | None = None) -> None:
        """Requantize ``weight`` (default: :meth:`merged_weight`) into the stored weight.

        The stored weight it replaces is kept for :meth:`unmerge`; the largest change
        beyond ΔW, ``max |dequantize(W_new) − weight|``, goes to
        :attr:`requantization_error`.
        """
        base = self.base_layer
        problem = self.weight_format.requantize_problem(base)
        if problem:
            raise StateError(f"cannot requantize this layer's weight: {problem}")
        new = self.merged_weight() if weight is None else weight
        kept = self.weight_format.snapshot(base)
        self.weight_format.requantize(base, new)
        self._kept = kept
        self._adopt()
        self.merged_adapters = self.held_active
        self._refresh()
        now = self.weight_format.dequantize(base).to(new.dtype)
        self.requantization_error = (now - new).abs().max().item() if now.numel() else 0.0

    def unmerge(self, names: str | Iterable[str] | None = None) -> None:
        """Put back the stored quantized weight from before the merge, bit for bit.

        A requantized weight holds all its merged adapters at once, so any ``names``
        unmerge them all.
        """
        if not self.merged_adapters:
            return
        self.weight_format.restore(self.base_layer, self._kept)
        self._kept = None
        self._adopt()
        self.merged_adapters = ()
        self._refresh()

    def _adopt(self) -> None:
        # The base module's weight (and buffers) were replaced: register the new ones here.
        base = self.base_layer
        self._parameters.update(base._parameters)
        self._buffers.update(base._buffers)

    # ----------------------------------------------------------- nn.Module plumbing
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoRAQuantizedLinear:
        super()._apply(fn, recurse)
        if self._kept is not None:  # the stored weight follows the layer (.to(device))
            self._kept = _apply_kept(self._kept, fn)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        # The base module writes its own entries (quantization statistics included), so
        # the keys are exactly those of the model before injection.
        self.base_layer._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        before_loading(self, state_dict, prefix)  # a merged flag that stays true
        if not self.merged_adapters:
            self._kept = None  # a loaded weight is the base weight now
        args = (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for hook in self._load_state_dict_pre_hooks.values():  # the base module's, moved here
            hook(state_dict, prefix, *args)
        # The base module's own loader (bitsandbytes reads its statistics), without the
        # adapters' keys, which it would take for unexpected ones.
        children = tuple(f"{prefix}{name}." for name in self._modules)
        own = {k: v for k, v in state_dict.items() if not k.startswith(children)}
        self.base_layer._load_from_state_dict(own, prefix, *args)
        self._adopt()

    def extra_repr(self) -> str:
        return super().extra_repr() + f" ({self.weight_format.kind(self.base_layer)})"


def _apply_kept(kept: object, fn: Callable[[Tensor], Tensor]) -> object:
    if isinstance(kept, Tensor):
        return fn(kept)
    if isinstance(kept, tuple):
        return tuple(_apply_kept(k, fn) for k in kept)
    return kept
