"""LoRA on ``nn.Linear`` layers whose weight torchao quantized (weight-only), and their formats.

Imported the first time a model holds such a weight; needs ``pip install loraplug[torchao]``.
torchao's ``quantize_(model, Int8WeightOnlyConfig())`` (or ``IntxWeightOnlyConfig`` for
int4 groups, ``Float8WeightOnlyConfig``, ...) keeps each layer an ``nn.Linear`` and swaps
its weight for a tensor subclass of the logical shape ``(out, in)`` that ``F.linear``
dispatches on; torchtune-style QLoRA puts an ``NF4Tensor`` (``to_nf4``) there. The layer is
recognised from its weight, and wrapped by :class:`LoRATorchaoLinear`.

Requantizing (``merge(model, requantize=True)``) rebuilds the same tensor type with the
same block size and target dtype: ``Int8Tensor`` (symmetric, or asymmetric when it has zero
points), ``IntxUnpackedToInt8Tensor`` (affine, symmetric when its zero points are all
zero) and ``NF4Tensor``; other types are refused with the reason.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor, MappingType, PerBlock
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4
from torchao.utils import TorchAOBaseTensor

from ._qlinear import LoRAQuantizedLinear
from ._quantized import QuantizedWeight, register_weight_format


class LoRATorchaoLinear(LoRAQuantizedLinear):
    """LoRA around an ``nn.Linear`` with a torchao-quantized weight: ``W_q x + b + s · B A x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchao.quantization import Int8WeightOnlyConfig, quantize_
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(64, 32))
        >>> quantize_(model, Int8WeightOnlyConfig())
        >>> lp.inject_lora(model, target="0", rank=4)
        ['0']
        >>> type(model[0]).__name__, model[0].lora_A["default"].shape
        ('LoRATorchaoLinear', torch.Size([4, 64]))
    """


def _set_weight(module: Any, tensor: Tensor) -> None:
    module._parameters["weight"] = nn.Parameter(tensor, requires_grad=False)


def _stored_bytes(tensors: list[Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


@register_weight_format(TorchAOBaseTensor)
class TorchaoFormat(QuantizedWeight):
    """torchao's quantized tensor subclasses (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ...)."""

    layer_class = LoRATorchaoLinear

    def kind(self, module: Any) -> str:
        weight = module.weight
        target = getattr(weight, "target_dtype", None)
        detail = f" {str(target).removeprefix('torch.')}" if target is not None else ""
        return f"torchao {type(weight).__name__}{detail}"

    def shape(self, module: Any) -> tuple[int, int]:
        return tuple(module.weight.shape)

    def dequantize(self, module: Any) -> Tensor:
        return module.weight.dequantize().detach()

    def requantize_problem(self, module: Any) -> str | None:
        weight = module.weight
        if type(weight) is Int8Tensor and weight.act_quant_kwargs is None:
            return None
        if type(weight) is IntxUnpackedToInt8Tensor and weight.activation_quantization is None:
            return None
        return (f"loraplug requantizes torchao's weight-only Int8Tensor and "
                f"IntxUnpackedToInt8Tensor (and NF4Tensor); this weight is a "
                f"{type(weight).__name__}{' with activation quantization' * _has_act(weight)}. "
                "Keep the adapter unmerged, or use loraplug.save_merged for full precision.")

    def requantize(self, module: Any, dense: Tensor) -> None:
        weight = module.weight
        dense = dense.to(weight.dtype)
        if type(weight) is Int8Tensor:
            mapping = MappingType.SYMMETRIC if weight.zero_point is None else \
                MappingType.ASYMMETRIC
            new = Int8Tensor.from_hp(dense, PerBlock(tuple(weight.block_size)),
                                     mapping_type=mapping, reduce_range=weight.reduce_range)
        else:
            symmetric = not weight.zero_point.any()
            new = IntxUnpackedToInt8Tensor.from_hp(
                dense, tuple(weight.block_size), weight.target_dtype,
                mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC)
        _set_weight(module, new)

    def bytes_per_weight(self, module: Any) -> float:
        weight = module.weight
        names = [*weight.tensor_data_names, *getattr(weight, "optional_tensor_data_names", ())]
        return _stored_bytes([getattr(weight, n, None) for n in names]) / weight.numel()


def _has_act(weight: Tensor) -> bool:
    return any(getattr(weight, name, None) is not None
               for name in ("act_quant_kwargs", "activation_quantization"))


@register_weight_format(NF4Tensor)
class NF4Format(QuantizedWeight):
    """torchao's ``NF4Tensor`` (torchtune's QLoRA): nf4 blocks, double-quantized scales."""

    layer_class = LoRATorchaoLinear

    def kind(self, module: Any) -> str:
        return "torchao NF4Tensor"

    def shape(self, module: Any) -> tuple[int, int]:
        return tuple(module.weight.shape)

    def dequantize(self, module: Any) -> Tensor:
        return module.weight.get_original_weight().detach()

    def requantize(self, module: Any, dense: Tensor) -> None:
        weight = module.weight
        _set_weight(module, to_nf4(dense.to(weight.dtype), weight.block_size,
                                   weight.scaler_block_size))

    def bytes_per_weight(self, module: Any) -> float:
        weight = module.weight
        return _stored_bytes([weight.quantized_data, weight.quantized_scalers,
                              weight.quantization_factor, weight.scaler_mean,
                              weight.nf4]) / weight.numel()
