"""How a LoRA layer reads its adapter state under ``torch.compile``: as tensor values.

Dynamo specialises a compiled graph on the Python values the traced code reads and
guards on them, so the eager forward's float scalings ``alpha / r`` and its tuple of
live adapters would be baked into the graph: changing alpha, switching adapters or
``disable_adapters`` would each compile a new graph (diffusers#9279). Under compilation
the forward reads its scalings from a non-persistent buffer ``_lora_scales`` of shape
(n_adapters,),

    g_a = s_a if adapter a is live (active, not disabled, not merged) else 0,

rewritten whenever alpha or the live set changes; the loop over adapters is the eager
one, handed a gate tensor where eager mode hands it a float. Without gradients (``torch.no_grad``,
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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._adapter_set import AdapterSet


def sync_gates(layer: AdapterSet) -> None:
    """Rewrite ``layer._lora_scales``: each adapter's scaling if it is live, else 0."""
    # A fresh tensor each time (not an in-place write): a graph still waiting for its
    # backward keeps the gates it ran with, and tensors made under inference_mode are
    # never written in place. Keep dtype and device, so dynamo's guards still hold.
    gates = [layer.scaling[n] if n in layer._live else 0.0 for n in layer.rank]
    old = layer._lora_scales
    with torch.inference_mode(False):
        layer._buffers["_lora_scales"] = torch.tensor(gates, dtype=old.dtype, device=old.device)


def gated_adapters(layer: AdapterSet) -> tuple[tuple[str, ...], dict[str, Tensor]]:
    """The adapters a compiled forward computes, and their gates as 0-d tensors."""
    # With gradients on, only the live adapters enter the graph, as in eager mode: an
    # adapter in the graph gets a gradient (zeros when gated off) that optimizers act
    # on (weight decay, momentum) and DDP all-reduces. Without gradients (inference),
    # every adapter is computed and gated, so switching needs no new graph.
    names = layer._live if torch.is_grad_enabled() else tuple(layer.rank)
    if not names or (layer.merged_adapters and not layer._live):  # merged: the base alone
        return (), {}
    gates = layer._lora_scales
    return names, {name: gates[i] for i, name in enumerate(layer.rank)}
