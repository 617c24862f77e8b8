"""What a new adapter is besides its rank and alpha: start values, DoRA, B's bias.

``inject_lora`` and ``load_adapter`` build adapters through these three steps, so that
every option is checked before any layer changes: :func:`option_problems` (per layer),
:func:`stage` (every tensor of the new adapter computed, nothing written) and
:func:`commit` (written into the layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _variants
from ._dora import dora_problem, initial_magnitude
from ._errors import ConfigError
from ._inits import init_problem, initial_adapter
from ._layer import LoRALayer
from ._matrix import matrix_shape


@dataclass(frozen=True)
class AdapterOptions:
    """How a new adapter starts and what it trains beyond A and B."""

    init: str = "kaiming"
    dora: bool = False
    lora_bias: bool = False

    @classmethod
    def checked(cls, init: str, dora: bool, lora_bias: bool) -> AdapterOptions:
        """The options, once checked to go together."""
        if dora and lora_bias:
            raise ConfigError("dora=True and lora_bias=True cannot be combined (nor can they "
                              "in PEFT): DoRA rescales the whole output channel. Choose one.")
        return cls(init, dora, lora_bias)


#: A plain adapter: Kaiming start, no DoRA, no bias.
PLAIN = AdapterOptions()


@dataclass
class Staged:
    """A new adapter's tensors for one layer, computed but not yet attached."""

    a: Tensor
    b: Tensor
    residual: Tensor | None = None  # the base weight an initialisation rewrites it to
    magnitude: Tensor | None = None
    bias: Tensor | None = None


def option_problems(layer: LoRALayer, rank: int, options: AdapterOptions) -> list[str]:
    """Why ``options`` cannot apply to ``layer`` at ``rank`` (empty when they can)."""
    found = [init_problem(layer, options.init, rank)]
    if options.dora:
        found.append(dora_problem(layer, rank))
    if options.lora_bias and ("bias" not in layer.base_layer._parameters
                              or layer.channel_shape(1) is None):
        found.append("lora_bias adds a bias to B's output channels, which merges into the "
                     "base layer's bias; this layer type has no bias (PEFT refuses it too). "
                     "Inject this layer without lora_bias=True.")
    return [why for why in found if why]


def scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def stage(layer: LoRALayer, rank: int, scale: float, options: AdapterOptions) -> Staged:
    """Every tensor of a new adapter on ``layer``; the layer is not changed."""
    a, b, residual = initial_adapter(layer, rank, scale, options.init)
    staged = Staged(a, b, residual)
    weight = layer.weight if residual is None else residual
    if options.dora:
        staged.magnitude = initial_magnitude(layer, a, b, scale, weight.detach())
    if options.lora_bias:
        channels, _ = matrix_shape(layer)
        staged.bias = torch.zeros(channels, dtype=weight.dtype, device=weight.device)
    return staged


def commit(layer: LoRALayer, name: str, staged: Staged, init: str) -> None:
    """Attach the staged extras of adapter ``name`` (A and B are attached already)."""
    layer.init[name] = init
    if staged.residual is not None:  # W − s·B₀A₀: the adapted model starts equal to the base
        with torch.no_grad():
            layer.weight.copy_(staged.residual)
        layer.initial_values[name] = (staged.a.detach().to("cpu", copy=True),
                                      staged.b.detach().to("cpu", copy=True))
    if staged.magnitude is not None:
        _variants.add_magnitude(layer, name, staged.magnitude)
    if staged.bias is not None:
        _variants.add_bias(layer, name, staged.bias)
