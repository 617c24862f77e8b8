"""A table of the LoRA layers in a model and its parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._adapters import lora_layers
from ._quantized import describe_weight, logical_shape, parameter_count
from ._registry import type_name


@dataclass(frozen=True)
class LayerSummary:
    """One LoRA layer: its name, base type, weight shape, adapters and added parameters.

    ``shape`` is the weight's logical shape (a quantized weight's, not its packed
    storage's); ``quantized`` tells whether it is stored quantized, ``weight`` how
    (``"float32"``, ``"bnb nf4 dq"``, ``"torchao Int8Tensor"``) and ``bytes_per_weight``
    what each element costs, its quantization statistics included.
    """

    name: str
    base_type: str
    shape: tuple[int, ...]
    adapters: tuple[tuple[str, int, float], ...]  # (adapter, rank, alpha)
    active: tuple[str, ...]
    merged: bool
    lora_parameters: int
    weight: str = ""
    bytes_per_weight: float = 0.0
    quantized: bool = False


@dataclass(frozen=True)
class LoRASummary:
    """What :func:`summary` returns; ``str()`` (and the REPL) shows it as a table."""

    layers: tuple[LayerSummary, ...]
    trainable: int
    total: int

    @property
    def lora_parameters(self) -> int:
        """Parameters added by all adapters of all layers."""
        return sum(row.lora_parameters for row in self.layers)

    def __str__(self) -> str:
        # Quantized models get a column for how each weight is stored.
        stored = any(row.quantized for row in self.layers)
        header = ("layer", "type", "shape", *(("weight (bytes/w)",) if stored else ()),
                  "adapters (r, alpha)", "active", "params")
        rows = [header] + [
            (
                row.name,
                row.base_type,
                "×".join(map(str, row.shape)),
                *((f"{row.weight} ({row.bytes_per_weight:.3g})",) if stored else ()),
                ", ".join(f"{n} ({r}, {a:g})" for n, r, a in row.adapters),
                ", ".join(row.active) + (" [merged]" if row.merged else ""),
                f"{row.lora_parameters:,}",
            )
            for row in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        lines.append(
            f"{len(self.layers)} LoRA layers, {self.lora_parameters:,} LoRA parameters; "
            f"trainable {self.trainable:,} of {self.total:,} ({share:.4f}%)"
        )
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> LoRASummary:
    """Return a table of the LoRA layers of ``model`` and its parameter counts.

    Each row has the layer's name, base type, weight shape, adapters with their rank and
    alpha, the active ones, and the parameters the adapters add (Linear:
    ``r · (in + out)``). ``str()`` of the result, or the REPL, shows the table. In a model
    with quantized weights, shapes are the logical ones, a column shows how each weight
    is stored and its bytes per weight, and ``total`` counts logical weights.

    Args:
        model: any model.

    Returns:
        A :class:`LoRASummary` with ``layers``, ``trainable`` and ``total`` counts.

    Example:
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = lp.inject_lora(model, target="0", rank=2, alpha=4)
        >>> print(lp.summary(model))
        layer  type       shape  adapters (r, alpha)  active   params
        -----  ---------  -----  -------------------  -------  ------
        0      nn.Linear  4×4    default (2, 4)       default  16
        1 LoRA layers, 16 LoRA parameters; trainable 16 of 36 (44.4444%)
    """
    rows = []
    for name, layer in lora_layers(model):
        kind, size = describe_weight(layer.base_layer) or ("", 0.0)
        rows.append(LayerSummary(
            name=name,
            base_type=type_name(type(layer.base_layer)),
            shape=logical_shape(layer.base_layer),
            adapters=tuple((n, layer.rank[n], layer.alpha[n]) for n in layer.adapter_names),
            active=layer.held_active,
            merged=layer.merged,
            lora_parameters=sum(p.numel() for s in (layer.lora_A, layer.lora_B)
                                for p in s.values()),
            weight=kind,
            bytes_per_weight=size,
            quantized=getattr(layer, "weight_format", None) is not None,
        ))
    params = list(model.parameters())
    return LoRASummary(
        layers=tuple(rows),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=parameter_count(model),
    )
