"""LoRA for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, grouped and depthwise at any rank.

For every number of groups g, ΔW is a rank-r product over the matrix view of the weight:

    W, ΔW (out, in/g, k…), viewed (out, in/g·∏k);    ΔW = s · B A
    A (r, in/g, k…), viewed (r, in/g·∏k);  B (out, r, 1…), viewed (out, r)

so every rank 1 ≤ r ≤ min(out, in/g·∏k) works, and ΔW has the weight's shape and merges
exactly: row o of a grouped weight acts on the input channels of o's group, and so does
ΔW[o]. Parameters: r·(in/g·∏k + out); a depthwise 3×3 convolution of C channels takes
r·(9 + C) at rank r, against 9·C for its weight. With g = 1 this is the usual layout:
A a convolution from ``in`` to r channels with the base's kernel, stride, padding,
dilation and padding mode, B a 1×1 convolution from r to ``out``.

As convolutions, A is shared by the groups and B is per output channel: A repeated g
times, convolved with g groups, gives each group G its own r channels h_G = A ⋆ x_G;
B is then a grouped 1×1 convolution (out, r, 1…) over the g·r channels, output o reading
those of its group: ``y_o += s · Σ_j B[o, j] h_{G(o), j}``.

Forward: an ungrouped convolution adds that branch to its output. A grouped one runs
one convolution on W + ΔW instead (ΔW costs out·r·in/g·∏k multiplications, far less
than the branch's g·r channels over every position), except where the branch is needed:
dropout in training, and PEFT's layout below.

PEFT's own layout for grouped convolutions, A (r, in, k…) reading every input channel
and B (out, r/g, 1…) grouped, loads too (from PEFT's files) and runs as PEFT runs it,
as a branch. Its ΔW mixes channels across groups, which no grouped weight can hold, so
merging it is refused with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ._errors import StateError
from ._layer import LoRALayer
from ._products import Scale, add_matmul
from ._registry import register_lora_layer


class LoRAConv(LoRALayer):
    """LoRA around an ``nn.Conv{1,2,3}d`` (or subclass), every geometry argument honoured.

    ``y = conv(x, W) + b + s · conv₁ₓ₁(conv(x, A), B)`` with A (r, in/g, k…) carrying the
    base's kernel, stride, padding, dilation and padding mode, shared by the g groups,
    and B (out, r, 1…) per output channel; ΔW = s · B A over the matrix view
    (out, in/g·∏k) of the weight (see the module docstring). Any rank works.
    """

    forward_methods = ("forward", "_conv_forward")
    conv: ClassVar[Callable[..., Tensor]]

    def configure(self, base: nn.Module) -> None:
        base = cast(_ConvNd, base)
        self.stride = base.stride
        self.dilation = base.dilation
        self.groups = base.groups
        self.in_per_group = base.in_channels // base.groups
        self.padding_mode = base.padding_mode
        if base.padding_mode == "zeros":
            self.padding = base.padding
            self._pad = None
        else:
            # Non-zero modes pad explicitly, then convolve without padding (as torch does).
            self.padding = (0,) * len(base.kernel_size)
            self._pad = base._reversed_padding_repeated_twice
        # 1×1, unit stride, no padding: A is a matmul over channels. On CPU a convolution
        # call costs tens of microseconds more than the matmul it amounts to.
        unpadded = isinstance(base.padding, str) or not any(base.padding)  # k = 1: "same" is 0
        self._pointwise = (all(k == 1 for k in base.kernel_size) and unpadded
                           and all(s == 1 for s in base.stride))
        self._choose_path()

    # ----------------------------------------------------------- which forward
    def _cross_group(self, a: Tensor) -> bool:
        # PEFT's layout: A reads every input channel, not those of one group.
        return self.groups > 1 and a.shape[1] != self.in_per_group

    def _choose_path(self) -> None:
        # Grouped: through W + ΔW, unless a live adapter needs the branch (dropout in
        # training, PEFT's layout). Ungrouped: the branch, but without gradients through
        # W + ΔW where that is cheaper (see _forward). Resolved when adapters or the mode
        # change, not per call.
        branch = any(self._cross_group(self._adapter(n)[0]) or
                     (self.training and self.dropout[n]) for n in self._live)
        self.through_weight = self.forward_differs or (self.groups > 1 and not branch)
        self._weight_when_no_grad = not (self.through_weight or branch)

    def _refresh(self) -> None:
        super()._refresh()
        if "groups" in self.__dict__:  # configured
            self._choose_path()

    def train(self, mode: bool = True) -> LoRAConv:
        super().train(mode)
        self._choose_path()
        return self

    # ----------------------------------------------------------- the math
    def _padded(self, x: Tensor) -> Tensor:
        return x if self._pad is None else F.pad(x, self._pad, mode=self.padding_mode)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return type(self).conv(self._padded(x), weight, bias, self.stride,
                               self.padding, self.dilation, self.groups)

    def base_forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self._tensor("weight"), self._tensor("bias"))

    def _forward(self, x: Tensor) -> Tensor:
        # Without gradients, one convolution on W + ΔW costs the base's plus ΔW
        # (out·r·in·∏k), while the branch convolves the input once more and reads and
        # writes the whole output. Taken where ΔW is the smaller cost; with gradients, the
        # branch (no weight gradient to compute).
        if torch.compiler.is_compiling():  # one graph for every adapter state
            return super()._forward(x)
        names = self._live
        if (names and self._weight_when_no_grad and self._detour is None
                and not torch.is_grad_enabled()):
            weight = self._tensor("weight")
            out, fan = weight.shape[0], weight[0].numel()
            rank = sum(self.rank[n] for n in names)
            positions = x.numel() // x.shape[-len(weight.shape) + 1] // math.prod(self.stride)
            if out * fan * (rank + 1) < positions * (rank * (fan + out) + 2 * out):
                return self._conv(x, self._adapted_weight(names, self.scaling),
                                  self._adapted_bias(names, self.scaling))
        return super()._forward(x)

    def _forward_through_weight(self, x: Tensor, names: tuple[str, ...],
                                scales: Mapping[str, Scale]) -> Tensor:
        if self.forward_differs:
            return super()._forward_through_weight(x, names, scales)
        # Compiled inference gates every adapter: those of PEFT's layout are off here.
        names = tuple(n for n in names if not self._cross_group(self._adapter(n)[0]))
        if not names:
            return self.base_forward(x)
        return self._conv(x, self._adapted_weight(names, scales),
                          self._adapted_bias(names, scales))

    def _down(self, x: Tensor, a: Tensor, groups: int) -> Tensor:
        # A: the base geometry from in to r channels (r·groups for stacked adapters).
        if self._pointwise and groups == 1 and x.dim() == a.dim() and not (
                torch.is_grad_enabled() and (a.requires_grad or x.requires_grad)):
            # (r, C) @ (N, C, S) -> (N, r, S): the same sums as the 1×1 convolution
            # (whose backward is the faster one, so only where nothing is recorded).
            h = torch.matmul(a.reshape(a.shape[0], -1), x.flatten(2))
            return h.view(x.shape[0], a.shape[0], *x.shape[2:])
        return type(self).conv(self._padded(x), a, None, self.stride, self.padding,
                               self.dilation, groups)

    def add_lora(self, out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: Scale) -> Tensor:
        g = self.groups
        if g > 1:
            if self._cross_group(a):  # PEFT's layout: A over every channel, (N, r, *S)
                h = self._down(x, a, 1)
            else:  # A once per group: (g·r, in/g, k…) -> (N, g·r, *S)
                h = self._down(x, a.repeat(g, *([1] * (a.dim() - 1))), g)
            return out + type(self).conv(h * scale, b, None, 1, 0, 1, g)
        h = self._down(x, a, 1)  # (N, r, *S)
        if (x.dim() != a.dim() or not isinstance(scale, float) or not out.numel()
                or not out.dtype == h.dtype == b.dtype
                or not (out.is_contiguous() and h.is_contiguous())):
            return out + type(self).conv(h * scale, b, None, 1, 0, 1, 1)
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
        # Row i is a group of its own: fold the rows into channels and convolve once.
        # x (n, C, *S) -> (1, n·C, *S); A (n, r, C/g, *k), once per conv group unless it
        # reads every channel; B (n, out, r…) -> (n·out, r…) with n·g groups.
        n, g = x.shape[0], self.groups
        groups = n
        if g > 1 and not self._cross_group(a[0]):
            a, groups = a.unsqueeze(1).expand(n, g, *a.shape[1:]).flatten(1, 2), n * g
        h = self._down(x.reshape(1, -1, *x.shape[2:]), a.flatten(0, 1), groups)
        h = h.view(n, -1, *h.shape[2:]) * scale.view(n, *([1] * (x.dim() - 1)))
        y = type(self).conv(h.view(1, -1, *h.shape[2:]), b.flatten(0, 1), None, 1, 0, 1, n * g)
        return y.view(n, -1, *y.shape[2:])  # (n, out, *S')

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        if self._cross_group(a):
            raise StateError(f"this adapter's ΔW has no weight-shaped form: {self._cross_reason()}")
        if not target.is_contiguous():  # e.g. a channels_last weight: go through a copy
            delta = torch.zeros(target.shape, dtype=target.dtype, device=target.device)
            self.add_delta(delta, a, b, scale)
            target.add_(delta)
            return
        out, rank = b.shape[0], a.shape[0]
        # (out, r) @ (r, in/g·k…) -> (out, in/g·k…), accumulated into the weight's view.
        add_matmul(target.view(out, -1), b.reshape(out, rank), a.reshape(rank, -1), scale)

    def channel_shape(self, channels: int) -> tuple[int, ...]:
        # outputs (N, out, *S): a channel vector as (1, out, 1…), PEFT's magnitude shape
        return (1, channels, *([1] * (self.weight.dim() - 2)))

    def delta_blocks(self, delta: Tensor) -> Tensor:
        # One product B A over the weight's matrix view, for any groups: (1, out, in/g·k…).
        return delta.reshape(1, delta.shape[0], -1)

    # ----------------------------------------------------------- shapes and files
    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, in_per_group, *kernel = self.weight.shape
        return (rank, in_per_group, *kernel), (out, rank, *((1,) * len(kernel)))

    def file_tensors(self, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor] | None:
        """Also PEFT's grouped layout, and loraplug's earlier one (B grouped, (out, r/g,
        1…)), which becomes this layout with the same ΔW: B zero outside each group."""
        found = super().file_tensors(a, b, rank)
        g = self.groups
        if found is not None or g == 1 or rank % g:
            return found
        (want_a, want_b), kernel = self.adapter_shapes(rank), a.shape[2:]
        out = want_b[0]
        if tuple(b.shape) != (out, rank // g, *want_b[2:]) or tuple(kernel) != want_a[2:]:
            return None
        if a.shape[:2] == (rank, self.in_per_group * g):  # PEFT's: A reads every channel
            return a, b
        if a.shape[:2] != (rank, self.in_per_group):
            return None
        # Earlier loraplug: group G used rows G·r/g … of A; place B's block there.
        blocks = torch.zeros(g, out // g, g, rank // g, dtype=b.dtype)
        blocks[torch.arange(g), :, torch.arange(g), :] = b.reshape(g, out // g, rank // g)
        return a, blocks.reshape(want_b)

    @property
    def merge_refusal(self) -> str | None:  # type: ignore[override]
        if any(self._cross_group(self._adapter(n)[0]) for n in self.held_active):
            return self._cross_reason()
        return None

    def _cross_reason(self) -> str:
        return (
            f"it is in PEFT's layout for grouped convolutions (A reads all "
            f"{self.in_per_group * self.groups} input channels, groups={self.groups}), whose "
            "ΔW is not block diagonal: no weight of a grouped convolution can hold it. Keep it "
            "unmerged (it runs as PEFT runs it), or train this layer with loraplug's layout."
        )


@register_lora_layer(nn.Conv1d)
class LoRAConv1d(LoRAConv):
    """LoRA around an ``nn.Conv1d``: x (N, in, L), A (r, in/g, k), B (out, r, 1).

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
        >>> model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, dilation=2, padding="same"))
        >>> lp.inject_lora(model, target=nn.Conv2d, rank=3)
        ['0']
        >>> model[0].lora_A["default"].shape, model[0].lora_B["default"].shape
        (torch.Size([3, 1, 3, 3]), torch.Size([8, 3, 1, 1]))
    """

    conv = staticmethod(F.conv2d)


@register_lora_layer(nn.Conv3d)
class LoRAConv3d(LoRAConv):
    """LoRA around an ``nn.Conv3d``: x (N, in, D, H, W), A (r, in/g, kd, kh, kw),
    B (out, r, 1, 1, 1).

    See :class:`LoRAConv` for the math.
    """

    conv = staticmethod(F.conv3d)
