"""The forward a LoRA layer runs under ``torch.compile``: adapter state as tensor values.

Dynamo specialises a compiled graph on the Python values the traced code reads and
guards on them, so the eager forward's float scalings ``alpha / r`` and its tuple of
live adapters would be baked into the graph: changing alpha, switching adapters or
``disable_adapters`` would each compile a new graph (diffusers#9279). Under compilation
a layer reads its scalings from a non-persistent buffer ``_lora_scales`` of shape
(n_adapters,),

    g_a = s_a if adapter a is live (active, not disabled, not merged) else 0,

rewritten whenever alpha or the live set changes. Without gradients (``torch.no_grad``,
``torch.inference_mode``) a layer computes every adapter it carries, gated:

    y = base(x) + Σ over all adapters a of  g_a · B_a A_a x,

so switching adapters, ``disable_adapters``, a new alpha and new weights reuse one
graph. With gradients on, only the live adapters enter the graph (scaled by g), as in
eager mode, so adapters that are not trained get no gradient: a new alpha or new
weights reuse the graph, and each distinct set of live adapters compiles once (dynamo
caches it). What recompiles: a new adapter (new parameters and shapes), ``merge`` (a
merged layer computes the base alone; ``unmerge`` returns to the cached graph) and the
first call after switching between training and evaluation mode.

An inactive adapter costs its low-rank products in inference, multiplied by zero (its
weights must be finite: 0 · inf is NaN); delete adapters a compiled model never uses.
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
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                scales = torch.tensor(gates, dtype=dtype, device=device)
        else:
            scales = torch.tensor(gates, dtype=dtype, device=device)
        if old is None:
            self.register_buffer("_lora_scales", scales, persistent=False)
        else:  # already registered (and non-persistent): skip register_buffer's checks
            self._buffers["_lora_scales"] = scales

    def _forward_compiled(self, x: Tensor) -> Tensor:
        if self._route is not None:  # adapter_per_sample: each row its own adapter
            return self._route.forward(self, x)
        # With gradients on, only the live adapters enter the graph, as in eager mode: an
        # adapter in the graph gets a gradient (zeros when gated off) that optimizers act
        # on (weight decay, momentum) and DDP all-reduces. Without gradients (inference),
        # every adapter is computed and gated, so switching needs no new graph.
        names = self._live if torch.is_grad_enabled() else tuple(self.rank)
        if not names or self.merged_adapters:
            return self._forward_through_weight(x) if self.through_weight else self.base_forward(x)
        # lora_forward and delta_weight read ``self.scaling[name]``; under compilation
        # they read the gate tensors instead of the floats, so one graph serves every
        # alpha. The floats are put back before returning.
        scales = self._lora_scales
        floats = self.__dict__["scaling"]
        self.__dict__["scaling"] = {name: scales[i] for i, name in enumerate(self.rank)}
        try:
            if self.through_weight:
                return self._compiled_through_weight(x, names)
            out = self.base_forward(x)
            for name in names:
                if self.training and self.dropout[name]:
                    out = out + self.lora_forward(self.lora_dropout[name](x), name)
                else:
                    out = out + self.lora_forward(x, name)
            return out
        finally:
            self.__dict__["scaling"] = floats

    def _compiled_through_weight(self, x: Tensor, names: tuple[str, ...]) -> Tensor:
        tensors = {k: v for k, v in self._parameters.items() if v is not None}
        tensors.update((k, v) for k, v in self._buffers.items()
                       if v is not None and k != "_lora_scales")
        weight = self.weight
        delta = sum(self.delta_weight(name) for name in names)
        tensors["weight"] = (weight.to(delta.dtype) + delta).to(weight.dtype)
        return torch.func.functional_call(self.base_layer, tensors, (x,))
