"""The forward a LoRA layer runs under ``torch.compile``: adapter state as tensor values.

Dynamo specialises a compiled graph on the Python values the traced code reads and
guards on them, so the eager forward's float scalings ``alpha / r`` and its tuple of
live adapters would be baked into the graph: changing alpha, switching adapters or
``disable_adapters`` would each compile a new graph (diffusers#9279). Under compilation
a layer instead computes every adapter it carries,

    y = base(x) + Σ over all adapters a of  g_a · B_a A_a dropout_a(x),
    g_a = s_a if a is live (active, not disabled, not merged) else 0,

with the gates g held in a non-persistent buffer ``_lora_scales`` of shape
(n_adapters,), rewritten whenever they change. The graph reads only tensor values, so
those changes need no recompilation. What still recompiles: adding or removing an
adapter, a new rank (new shapes), merge/unmerge (a merged layer computes the base alone),
``train()``/``eval()`` and a new dtype or device.

An inactive adapter costs its low-rank products, multiplied by zero (their weights must
be finite: 0 · inf is NaN); delete adapters a compiled model never uses.
"""

from __future__ import annotations

import torch
from torch import Tensor


class CompiledForwardMixin:
    """``_forward_compiled`` and its gate buffer, mixed into :class:`LoRALayer`."""

    def _sync_compiled_scales(self) -> None:
        # A fresh tensor each time (not an in-place write): a graph still waiting for its
        # backward keeps the gates it ran with, and tensors made under inference_mode are
        # never written in place. Keep dtype and device, so dynamo's guards still hold.
        gates = [self.scaling[n] if n in self._live else 0.0 for n in self.rank]
        old = self._buffers.get("_lora_scales")
        if old is None:
            dtype, device = torch.float32, self.weight.device
        else:
            dtype, device = old.dtype, old.device
        with torch.inference_mode(False), torch.no_grad():
            scales = torch.tensor(gates, dtype=dtype, device=device)
        self.register_buffer("_lora_scales", scales, persistent=False)

    def _forward_compiled(self, x: Tensor) -> Tensor:
        if not self.rank or self.merged_adapters:
            return self._forward_through_weight(x) if self.through_weight else self.base_forward(x)
        # lora_forward and delta_weight read ``self.scaling[name]``; under compilation
        # they read the gate tensors instead of the floats, so one graph serves every
        # alpha and every choice of live adapters. The floats are put back at once.
        scales = self._lora_scales
        floats = self.__dict__["scaling"]
        self.__dict__["scaling"] = {name: scales[i] for i, name in enumerate(self.rank)}
        try:
            if self.through_weight:
                return self._compiled_through_weight(x)
            out = self.base_forward(x)
            for name in self.rank:
                if self.training and self.dropout[name]:
                    out = out + self.lora_forward(self.lora_dropout[name](x), name)
                else:
                    out = out + self.lora_forward(x, name)
            return out
        finally:
            self.__dict__["scaling"] = floats

    def _compiled_through_weight(self, x: Tensor) -> Tensor:
        tensors = {k: v for k, v in self._parameters.items() if v is not None}
        tensors.update((k, v) for k, v in self._buffers.items()
                       if v is not None and k != "_lora_scales")
        weight = self.weight
        delta = sum(self.delta_weight(name) for name in self.rank)
        tensors["weight"] = (weight.to(delta.dtype) + delta).to(weight.dtype)
        return torch.func.functional_call(self.base_layer, tensors, (x,))
