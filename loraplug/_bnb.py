"""LoRA on bitsandbytes' quantized Linear layers: ``Linear4bit`` (nf4, fp4) and ``Linear8bitLt``.

Imported (and so registered) the first time a model holds one of these layers; needs
``pip install loraplug[bnb]``. Both layers subclass ``nn.Linear`` but store their weight
packed, so they get their own LoRA layers (:class:`LoRAQuantizedLinear`, which calls the
layer's own forward) and weight formats:

- 4-bit: ``weight`` is a ``Params4bit`` of shape ``(out·in/2, 1)`` (uint8) with a
  ``quant_state`` (one absmax per block of 64 weights, itself 8-bit quantized with
  double quantization). On CPUs with AVX512-BF16, bitsandbytes repacks the weight for
  its inference kernel (scales rounded to bfloat16) on the first forward in eval mode
  with an input that needs no gradient; loraplug reads the weight in the canonical
  layout, and ``state_dict`` restores that layout correctly (see :func:`_unpacked`).
- 8-bit: ``weight`` is an ``Int8Params`` (int8, ``(out, in)``) with one float32 scale per
  row (``SCB``), kept on the weight until the first forward and on the layer's
  ``state`` after it; ``W = CB · SCB / 127``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import (
    _convert_weight_packed_for_cpu_inverse,
    dequantize_4bit,
    int8_vectorwise_dequant,
)
from torch import Tensor

from ._qlinear import LoRAQuantizedLinear
from ._quantized import QuantizedWeight, register_weight_format
from ._registry import register_lora_layer


def _unpacked(weight: Any) -> tuple[Tensor, Any]:
    """``(data, quant_state)`` of a 4-bit weight in the canonical layout; the weight is kept.

    bitsandbytes' inverse of its CPU packing leaves a non-nested absmax in the packed
    layout ((in/64, out) bfloat16 instead of (out·in/64,) float32) in 0.50, so that
    dequantizing or saving afterwards reads scrambled scales; it is put right here.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    nested = state.original_nested
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
    if not nested:
        state.absmax = state.absmax.T.reshape(-1).float()  # (in/64, out) -> (out·in/64,)
    return data, state


def _canonical_4bit(module: Any) -> None:
    # The canonical layout in place (bitsandbytes repacks on its next inference forward).
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _unpacked(weight)
        module.quant_state = weight.quant_state


@register_weight_format(bnb.nn.Params4bit)
class Params4bitFormat(QuantizedWeight):
    """bitsandbytes 4-bit blockwise weights (nf4 or fp4, optional double quantization)."""

    state_keys = ("weight.",)

    def kind(self, module: Any) -> str:
        weight = module.weight
        double = " dq" if weight.compress_statistics else ""
        return f"bnb {weight.quant_type}{double}"

    def dequantize(self, module: Any) -> Tensor:
        weight = module.weight
        if weight.quant_state is None:  # not quantized yet (before moving to a device)
            return weight.data.detach().clone()
        return dequantize_4bit(*_unpacked(weight))

    def requantize(self, module: Any, dense: Tensor) -> None:
        _canonical_4bit(module)
        old = module.weight
        state = old.quant_state
        new: Any = bnb.nn.Params4bit(
            dense.to(state.dtype).contiguous().to("cpu"), requires_grad=False,
            blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=old.quant_storage, module=module,
        )
        module._parameters["weight"] = new.to(device=old.device)  # quantizes
        module.quant_state = module.weight.quant_state

    def requantize_problem(self, module: Any) -> str | None:
        if module.weight.quant_state is None:
            return "the weight is not quantized yet (move the layer to a device first)."
        return None

    def restore(self, module: Any, kept: Any) -> None:
        module._parameters["weight"] = kept
        module.quant_state = kept.quant_state

    def bytes_per_weight(self, module: Any) -> float:
        weight = module.weight
        state = weight.quant_state
        out_features, in_features = self.shape(module)
        if state is None:  # not quantized yet: what quantizing will store
            stats = 1 / weight.blocksize + 4 / (weight.blocksize * 256) \
                if weight.compress_statistics else 4 / weight.blocksize
            return 0.5 + stats
        stored = [weight.data, state.absmax, state.code]
        if state.nested:
            stored += [state.state2.absmax, state.state2.code]
        return sum(t.numel() * t.element_size() for t in stored) / (out_features * in_features)


@register_weight_format(bnb.nn.Int8Params)
class Int8ParamsFormat(QuantizedWeight):
    """bitsandbytes LLM.int8() weights: int8 rows with one float32 scale each."""

    state_keys = ("SCB", "weight_format")

    def kind(self, module: Any) -> str:
        return "bnb int8" if module.weight.dtype == torch.int8 else "bnb int8 (not quantized)"

    @staticmethod
    def _scales(module: Any) -> Tensor:
        scb = module.weight.SCB  # on the weight until the first forward, then on the state
        return module.state.SCB if scb is None else scb

    def dequantize(self, module: Any) -> Tensor:
        weight = module.weight
        if weight.dtype != torch.int8:  # has_fp16_weights, or not moved to a device yet
            return weight.data.detach().clone()
        return int8_vectorwise_dequant(weight.data, self._scales(module))

    def requantize(self, module: Any, dense: Tensor) -> None:
        device = module.weight.device
        new: Any = bnb.nn.Int8Params(dense.to("cpu", torch.float16), requires_grad=False,
                                has_fp16_weights=False)
        module._parameters["weight"] = new.to(device=device)  # quantizes
        module.init_8bit_state()  # scales on the layer's state, as after a forward

    def requantize_problem(self, module: Any) -> str | None:
        if module.weight.dtype != torch.int8:
            return ("the layer keeps float16 weights (has_fp16_weights=True) or is not "
                    "quantized yet; nothing to requantize.")
        return None

    def snapshot(self, module: Any) -> object:
        weight = module.weight
        return (weight, weight.CB, weight.SCB, module.state.CB, module.state.SCB)

    def restore(self, module: Any, kept: Any) -> None:
        weight, weight_cb, weight_scb, state_cb, state_scb = kept
        weight.CB, weight.SCB = weight_cb, weight_scb
        module.state.CB, module.state.SCB = state_cb, state_scb
        module._parameters["weight"] = weight

    def bytes_per_weight(self, module: Any) -> float:
        weight = module.weight
        out_features, in_features = self.shape(module)
        if weight.dtype != torch.int8:
            return 1 + 4 / in_features  # what quantizing will store
        return (weight.numel() + self._scales(module).numel() * 4) / (out_features * in_features)


@register_lora_layer(bnb.nn.Linear4bit)
class LoRALinear4bit(LoRAQuantizedLinear):
    """LoRA around bitsandbytes' ``Linear4bit`` (nf4/fp4): ``Linear4bit(x) + s · B A x``.

    A is ``(r, in_features)`` and B ``(out_features, r)`` in float32; the base's 4-bit
    matmul runs in its ``compute_dtype`` as before.
    """

    def base_forward(self, x: Tensor) -> Tensor:
        # bitsandbytes packs the weight for its inference kernel, which has no backward,
        # on an eval forward without gradients; a later step that needs gradients (training
        # after evaluating) must run on the canonical layout, or it fails in bitsandbytes.
        if (self.training or x.requires_grad) and \
                getattr(self.weight.quant_state, "packing_format_for_cpu", False):
            _canonical_4bit(self.base_layer)
        return self.base_layer.forward(x)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        _canonical_4bit(self.base_layer)  # bitsandbytes' own inverse scrambles some scales
        super()._save_to_state_dict(destination, prefix, keep_vars)


@register_lora_layer(bnb.nn.Linear8bitLt)
class LoRALinear8bitLt(LoRAQuantizedLinear):
    """LoRA around bitsandbytes' ``Linear8bitLt``: ``Linear8bitLt(x) + s · B A x``."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoRALinear8bitLt:
        super()._apply(fn, recurse)
        # The row scales live on the layer's state, outside parameters: move them along
        # (device only, as bitsandbytes' own .to() does).
        state, device = self.base_layer.state, self.weight.device
        for key in ("CB", "SCB"):
            value = getattr(state, key)
            if value is not None:
                setattr(state, key, value.to(device))
        return self
