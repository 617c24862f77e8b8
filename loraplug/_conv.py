"""LoRA for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

A is a convolution from ``in`` to ``r`` channels with the base layer's own kernel size,
stride, padding, dilation, padding mode and groups; B is a 1×1 convolution from ``r`` to
``out`` channels with the same groups. Their composition is one convolution with

    ΔW[o, i, k…] = s · Σ_j B[o, j] · A[j, i, k…]        (within each group)

Shapes, for groups g and kernel k…: W (out, in/g, k…), A (r, in/g, k…),
B (out, r/g, 1…), ΔW (out, in/g, k…). Each group g' maps input channels of group g' to
output channels of group g' only, so ΔW is block diagonal like W and merges exactly;
that needs ``r`` divisible by ``g`` (r/g rank per group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ._layer import LoRALayer
from ._products import Scale, add_matmul
from ._registry import register_lora_layer


class LoRAConv(LoRALayer):
    """LoRA around an ``nn.Conv{1,2,3}d`` (or subclass), every geometry argument honoured.

    ``y = conv(x, W) + b + s · conv₁ₓ₁(conv(x, A), B)`` with A (r, in/g, k…) carrying the
    base's kernel, stride, padding, dilation, padding mode and groups g, and B
    (out, r/g, 1…) a grouped pointwise convolution; ΔW (out, in/g, k…) is their per-group
    product (see the module docstring). ``rank`` must be divisible by ``groups``.
    """

    forward_methods = ("forward", "_conv_forward")
    conv: ClassVar[Callable[..., Tensor]]

    def configure(self, base: nn.Module) -> None:
        base = cast(_ConvNd, base)
        self.stride = base.stride
        self.dilation = base.dilation
        self.groups = base.groups
        self.padding_mode = base.padding_mode
        if base.padding_mode == "zeros":
            self.padding = base.padding
            self._pad = None
        else:
            # Non-zero modes pad explicitly, then convolve without padding (as torch does).
            self.padding = (0,) * len(base.kernel_size)
            self._pad = base._reversed_padding_repeated_twice

    def _padded(self, x: Tensor) -> Tensor:
        return x if self._pad is None else F.pad(x, self._pad, mode=self.padding_mode)

    def base_forward(self, x: Tensor) -> Tensor:
        return type(self).conv(
            self._padded(x), self._tensor("weight"), self._tensor("bias"), self.stride,
            self.padding, self.dilation, self.groups,
        )

    def _down(self, x: Tensor, a: Tensor, groups: int) -> Tensor:
        # A: the base geometry from in to r channels (r·groups for stacked adapters).
        return type(self).conv(self._padded(x), a, None, self.stride, self.padding,
                               self.dilation, groups)

    def add_lora(self, out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Scale) -> Tensor:
        h = self._down(x, a, self.groups)  # (N, r, *S)
        if (self.groups > 1 or x.dim() != a.dim() or not isinstance(scale, float)
                or not out.dtype == h.dtype == b.dtype
                or not (out.is_contiguous() and h.is_contiguous())):
            return out + type(self).conv(h * scale, b, None, 1, 0, 1, self.groups)
        # B is a 1×1 convolution: per sample, out (c, S) += s · B (c, r) @ h (r, S), as
        # one batched GEMM that accumulates into out (in place unless autograd records:
        # see add_scaled_product).
        n, c, rank = out.shape[0], out.shape[1], h.shape[1]
        flat, b, h = out.view(n, c, -1), b.view(1, c, rank).expand(n, c, rank), h.view(n, rank, -1)
        if torch.is_grad_enabled():
            return torch.baddbmm(flat, b, h, alpha=scale).view(out.shape)
        flat.baddbmm_(b, h, alpha=scale)
        return out

    def routed_lora(self, x: Tensor, a: Tensor, b: Tensor, scale: Tensor,
                    slot: Tensor | None) -> Tensor:
        if slot is not None:  # one (A, B, s) per row, gathered from the stacked adapters
            a, b, scale = a[slot], b[slot], scale[slot]
        # Row i is a group of its own: fold the rows into channels and convolve once with
        # rows·groups groups. x (n, C, *S) -> (1, n·C, *S); A (n, r, C/g, *k) -> (n·r, C/g, *k).
        n, g = x.shape[0], self.groups
        h = self._down(x.reshape(1, -1, *x.shape[2:]), a.flatten(0, 1), n * g)
        h = h.view(n, -1, *h.shape[2:]) * scale.view(n, *([1] * (x.dim() - 1)))
        y = type(self).conv(h.view(1, -1, *h.shape[2:]), b.flatten(0, 1), None, 1, 0, 1, n * g)
        return y.view(n, -1, *y.shape[2:])  # (n, out, *S')

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        if not target.is_contiguous():  # e.g. a channels_last weight: go through a copy
            delta = torch.zeros(target.shape, dtype=target.dtype, device=target.device)
            self.add_delta(delta, a, b, scale)
            target.add_(delta)
            return
        g, out, rank = self.groups, b.shape[0], a.shape[0]
        # Per group: (out/g, r/g) @ (r/g, in/g·k…) -> (out/g, in/g·k…), accumulated into
        # the groups of target, (g, out/g, in/g·k…).
        add_matmul(target.view(g, out // g, -1), b.reshape(g, out // g, rank // g),
                   a.reshape(g, rank // g, -1), scale)

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, in_per_group, *kernel = self.weight.shape
        ones = (1,) * len(kernel)
        return (rank, in_per_group, *kernel), (out, rank // self.groups, *ones)

    def max_rank(self) -> int:
        out, *rest = self.weight.shape
        per_group_in = 1
        for n in rest:
            per_group_in *= n
        return self.groups * min(out // self.groups, per_group_in)

    def check_rank(self, rank: int) -> str | None:
        if rank % self.groups:
            multiple = self.groups * -(-rank // self.groups)
            return (
                f"groups={self.groups} needs a rank divisible by {self.groups} so that ΔW stays "
                f"block diagonal and mergeable; received rank={rank}. Use rank={multiple}, or "
                "exclude grouped convolutions, e.g. exclude=lambda name, m: "
                "getattr(m, 'groups', 1) > 1."
            )
        return None


@register_lora_layer(nn.Conv1d)
class LoRAConv1d(LoRAConv):
    """LoRA around an ``nn.Conv1d``: x (N, in, L), A (r, in/g, k), B (out, r/g, 1).

    See :class:`LoRAConv` for the math.
    """

    conv = staticmethod(F.conv1d)


@register_lora_layer(nn.Conv2d)
class LoRAConv2d(LoRAConv):
    """LoRA around an ``nn.Conv2d``; see :class:`LoRAConv` for the math.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, dilation=2, padding="same"))
        >>> lp.inject_lora(model, target=nn.Conv2d, rank=2)
        ['0']
        >>> model[0].lora_A["default"].shape, model[0].lora_B["default"].shape
        (torch.Size([2, 2, 3, 3]), torch.Size([8, 1, 1, 1]))
    """

    conv = staticmethod(F.conv2d)


@register_lora_layer(nn.Conv3d)
class LoRAConv3d(LoRAConv):
    """LoRA around an ``nn.Conv3d``: x (N, in, D, H, W), A (r, in/g, kd, kh, kw),
    B (out, r/g, 1, 1, 1).

    See :class:`LoRAConv` for the math.
    """

    conv = staticmethod(F.conv3d)
