"""LoRA on a bare ``nn.Parameter``: the module that owns it computes with W + ΔW.

Some weights are not held by a layer loraplug knows: MoE expert stacks, custom layers
that call ``F.linear(x, self.w)`` on their own parameter, any module type the registry
lacks. Such a parameter takes LoRA through the weight: its owner runs its own forward
with the parameter replaced by

    W' = W + Σ_a s_a ΔW_a        (over the live adapters a, s_a = alpha_a / r_a)

so whatever the owner does with it, the adapted function is exactly the merged one.
Layouts, for a parameter W of shape (out, *rest):

- **matrix** (2 dims, or 4 and more): ΔW is the rank-r product over the matrix view
  (out, ∏rest); A (r, *rest), B (out, r), ``ΔW = (B @ A.flatten(1)).view_as(W)``;
  r·(∏rest + out) parameters.
- **experts** (3 dims: a stack of E matrices, PEFT's ``target_parameters`` layout):
  W is (E, out, in), or (E, in, out) when the owner has ``is_transposed = True``; each
  expert e has its own rank-r pair, stored as PEFT stores them: A (E·r, in) with
  A_e = ``A.view(E, r, in)[e]``, B (out, r·E) with B_e = ``B.view(out, r, E)[:, :, e]``;
  ΔW_e = B_e A_e (out, in), transposed for (E, in, out) storage; E·r·(in + out)
  parameters.

In the model, the owner is replaced by a :class:`LoRAParameterHost` that adopts its
tensors and children under their own names (state-dict keys unchanged) and holds one
:class:`LoRAParameter` layer per adapted parameter in ``lora_parameters``; ``unload``
puts the owner back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._compile import gated_adapters
from ._layer import LoRALayer
from ._owner_reads import read_in_forward
from ._products import Scale, add_matmul
from ._stand_in import StandIn

#: The host's child that holds its parameter layers, one per adapted parameter name.
SLOT = "lora_parameters"


class LoRAParameter(LoRALayer):
    """LoRA on one parameter of a module, computed through the weight (see module doc).

    Attributes:
        parameter_name: the adapted parameter's name in its owner (``"gate_up_proj"``).
        experts: whether the parameter is a 3-D stack of expert matrices.
        transposed: experts stored (E, in, out) (the owner's ``is_transposed``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> class Experts(nn.Module):  # 4 experts, each a (6, 5) matrix
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.randn(4, 6, 5))
        ...     def forward(self, x):  # x (4, tokens, 5) -> (4, tokens, 6)
        ...         return torch.bmm(x, self.w.transpose(1, 2))
        >>> model = nn.Sequential(Experts())
        >>> lp.inject_lora(model, target_parameters="0.w", rank=2)
        ['0.w']
        >>> layer = model[0].lora_parameters["w"]
        >>> layer.lora_A["default"].shape, layer.lora_B["default"].shape  # E·r
        (torch.Size([8, 5]), torch.Size([6, 8]))
    """

    forward_methods = ()
    supports_dropout = False

    def __init__(self, host: LoRAParameterHost, parameter_name: str) -> None:
        owner = host.base_layer
        # Set before nn.Module's init: LoRALayer's init reads the weight.
        self.__dict__["_host"] = host
        self.__dict__["parameter_name"] = parameter_name
        # No tensors to adopt: the parameter stays registered on the host under its name.
        super().__init__(nn.Module(), type(owner))
        self.__dict__["base_layer"] = owner
        self.forward_differs = self.through_weight = True  # the host computes it
        weight = self.weight
        self.experts = weight.dim() == 3
        self.transposed = self.experts and getattr(owner, "is_transposed", False) is True

    @property
    def host(self) -> LoRAParameterHost:
        """The module that stands in for the parameter's owner."""
        return self.__dict__["_host"]

    @property
    def weight(self) -> Tensor:
        """The adapted parameter, as registered on the host."""
        return self.__dict__["_host"]._parameters[self.parameter_name]

    def weight_key(self) -> tuple[nn.Module, str]:
        return self.host, self.parameter_name

    # ----------------------------------------------------------- layout
    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = tuple(self.weight.shape)
        if not self.experts:
            return (rank, *shape[1:]), (shape[0], rank)
        n, rows, cols = shape
        in_f, out_f = (rows, cols) if self.transposed else (cols, rows)
        return (n * rank, in_f), (out_f, rank * n)

    def max_rank(self) -> int:
        shape = self.weight.shape
        if self.experts:
            return min(shape[1], shape[2])
        return min(shape[0], self.weight[0].numel())

    def _factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(lhs, rhs) with ΔW / s = lhs @ rhs: 2-D over the matrix view, or per expert."""
        if not self.experts:
            return b, a.reshape(a.shape[0], -1)  # (out, r) @ (r, ∏rest)
        n = self.weight.shape[0]
        a_e = a.view(n, -1, a.shape[-1])  # (E, r, in): rows e·r … e·r + r - 1
        b_e = b.view(b.shape[0], -1, n).permute(2, 0, 1)  # (E, out, r): columns j·E + e
        if self.transposed:
            return a_e.transpose(1, 2), b_e.transpose(1, 2)  # (E, in, r) @ (E, r, out)
        return b_e, a_e  # (E, out, r) @ (E, r, in)

    def add_delta(self, target: Tensor, a: Tensor, b: Tensor, scale: Scale) -> None:
        """``target += scale · ΔW`` in place; ``target`` shaped like the parameter."""
        lhs, rhs = self._factors(a, b)
        if not target.is_contiguous():  # e.g. a transposed parameter: through a copy
            delta = torch.zeros(target.shape, dtype=target.dtype, device=target.device)
            self.add_delta(delta, a, b, scale)
            target.add_(delta)
        elif self.experts:
            add_matmul(target, lhs, rhs, scale)  # (E, out, r) @ (E, r, in), batched
        else:
            add_matmul(target.view(target.shape[0], -1), lhs, rhs, scale)

    def adapted_weight(self) -> Tensor | None:
        """``W + Σ s·ΔW`` over the live adapters, differentiable in A and B.

        Computed in float32 for half-precision weights and cast back once; ``None`` when
        no adapter is live.
        """
        names: tuple[str, ...]
        scales: Mapping[str, Scale]
        if torch.compiler.is_compiling():  # adapter state as tensors: see _compile.py
            names, scales = gated_adapters(self)
        else:
            names, scales = self._live, self.scaling
        return self._adapted_weight(names, scales) if names else None

    def add_adapter(self, name: str, a: Tensor, b: Tensor, *, alpha: float, dropout: float,
                    use_rslora: bool = False) -> None:
        super().add_adapter(name, a, b, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        if self.experts:  # A stacks the experts' ranks: (E·r, in)
            self.rank[name] = a.shape[0] // self.weight.shape[0]
            self.set_scale(name, alpha)

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        raise NotImplementedError(
            f"LoRAParameter({self.parameter_name!r}) is not called: its host runs the owner's "
            "forward with the adapted weight. Call the host module instead.")

    # ----------------------------------------------------------- plumbing
    def sync_base(self) -> None:
        """Point the owner at the host's current tensors (the host holds them)."""
        self.host.sync_base()

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={self.rank[n]} alpha={self.alpha[n]:g}" for n in self.adapter_names)
        layout = "experts" if self.experts else "matrix"
        state = " merged" if self.merged else ""
        return (f"{self.parameter_name} {tuple(self.weight.shape)} {layout} "
                f"[{adapters}]{state}")


class LoRAParameterHost(StandIn):
    """Stands in for a module whose parameters carry LoRA; runs its forward on W + ΔW.

    The owner's parameters, buffers and children are registered here under their own
    names, so ``state_dict`` keys do not change; the owner object is kept (unregistered)
    as ``base_layer`` and returned by ``unload``. ``lora_parameters`` maps a parameter
    name to its :class:`LoRAParameter`. Forward: the owner's own forward, through
    ``torch.func.functional_call`` with each adapted parameter replaced by
    ``layer.adapted_weight()`` (the owner itself when no adapter is live). Before each
    forward the owner is pointed at the host's current tensors and children (replaced
    by ``load_state_dict(assign=True)`` or by adapters on its children), and the owner's
    hooks stay on the owner, which is called as usual. Another module reading an adapted
    parameter from the host in its forward sees ``W + ΔW``, as with a LoRA layer's weight.
    """

    sync_children = True

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.adopt(owner)
        self.lora_parameters = nn.ModuleDict()

    def forward(self, *args: object, **kwargs: object) -> object:
        self.sync_base()
        swapped = {}
        for name, layer in self.layers().items():
            weight = layer.adapted_weight()
            if weight is not None:
                swapped[name] = weight
        owner = self.__dict__["base_layer"]
        if not swapped:
            return owner(*args, **kwargs)
        return torch.func.functional_call(owner, swapped, args, kwargs)

    def layers(self) -> dict[str, LoRAParameter]:
        """Parameter name -> its layer."""
        registry: dict[str, Any] = self._modules
        return registry[SLOT]._modules

    def __getattr__(self, name: str) -> Any:
        # An adapted parameter read in another module's forward: W + ΔW (see _owner_reads).
        layers = self.__dict__["_modules"][SLOT]._modules if SLOT in self.__dict__.get(
            "_modules", {}) else {}
        if name in layers and read_in_forward():
            weight = layers[name].adapted_weight()
            if weight is not None:
                return weight
        return super().__getattr__(name)  # the owner's own attributes read through

    def extra_repr(self) -> str:
        return f"{self.__dict__['base_layer'].__class__.__name__}"
