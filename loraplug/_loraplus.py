"""LoRA+: optimizer parameter groups that give B a larger learning rate than A.

Hayou, Ghosh and Yu (2024, https://arxiv.org/abs/2402.12354) show that with one learning
rate for both factors, the update of a wide layer's ``B A`` is dominated by A's or by B's
side, and that training is faster and better when ``η_B = ratio · η_A`` with a ratio
of about 16 (2 to 32 in their sweeps). For embedding layers A and B read one-hot rows and
their scaling argument does not hold; the paper's code trains their adapters at a small
learning rate of their own (1e-6 by default), as PEFT's ``create_loraplus_optimizer``
does. This module only sorts parameters into groups; any ``torch.optim`` optimizer takes
them.
"""

from __future__ import annotations

import math

from torch import nn

from ._adapters import lora_layers
from ._errors import ConfigError


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"loraplus_param_groups: {name} must be a finite number > 0; "
                          f"received {value!r}.")
    return float(value)


def loraplus_param_groups(
    model: nn.Module, *, lr: float, ratio: float = 16.0, embedding_lr: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, object]]:
    """Optimizer parameter groups for LoRA+: B learns ``ratio`` times faster than A.

    Every parameter of ``model`` with ``requires_grad`` lands in exactly one group:

    - ``"lora_A"``: the A factors of non-embedding layers, at ``lr``;
    - ``"lora_B"``: their B factors, B's bias and DoRA magnitudes, at ``ratio · lr``
      (as PEFT's ``create_loraplus_optimizer`` groups them);
    - ``"embedding"``: A and B of embedding layers, at ``embedding_lr``;
    - ``"other"``: anything else that trains (a new head, trained modules), at ``lr``.

    Empty groups are left out. Each group carries its ``name``, which torch optimizers
    keep beside their own settings, so schedulers and logs can tell the groups apart.
    With ``weight_decay > 0``, one-dimensional tensors (biases, magnitudes) of each kind
    go to a group of their own, ``"<name>_no_decay"``, without decay.

    Args:
        model: a model with adapters (``inject_lora`` or ``load_adapter``).
        lr: the learning rate of A, η_A.
        ratio: η_B / η_A; the paper recommends about 16.
        embedding_lr: the learning rate of embedding adapters.
        weight_decay: the decoupled weight decay of every group but the ``_no_decay`` ones.

    Returns:
        A list of ``{"name", "params", "lr", "weight_decay"}`` dicts for
        ``torch.optim.AdamW(groups)`` or any other optimizer.

    Raises:
        ConfigError: a rate or the ratio is not a finite positive number, the weight
            decay is negative, or nothing in ``model`` trains.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = lp.inject_lora(model, target=nn.Linear, rank=2)
        >>> groups = lp.loraplus_param_groups(model, lr=1e-4, ratio=16)
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in groups]
        [('lora_A', 2, 0.0001), ('lora_B', 2, 0.0016)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    lr = _positive("lr", lr)
    ratio = _positive("ratio", ratio)
    embedding_lr = _positive("embedding_lr", embedding_lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"loraplus_param_groups: weight_decay must be a finite number >= 0; "
                          f"received {weight_decay!r}.")
    kind: dict[int, str] = {}
    for _, layer in lora_layers(model):
        embedding = layer.peft_key_style == "embedding"
        for store, side in (("lora_A", "lora_A"), ("lora_B", "lora_B"),
                            ("lora_B_bias", "lora_B"), ("lora_magnitude_vector", "lora_B")):
            params = layer._modules.get(store)
            for p in ([] if params is None else params.parameters()):
                kind[id(p)] = "embedding" if embedding else side
    rates = {"lora_A": lr, "lora_B": lr * ratio, "embedding": embedding_lr, "other": lr}
    split = weight_decay > 0  # vectors (biases, magnitudes) get a group without decay
    groups: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            name = kind.get(id(p), "other")
            name += "_no_decay" if split and p.dim() <= 1 else ""
            groups.setdefault(name, []).append(p)
    if not groups:
        raise ConfigError(
            "loraplus_param_groups: no parameter of the model requires a gradient; inject or "
            "load an adapter first (loraplug.inject_lora)."
        )
    order = [n + s for n in rates for s in ("", "_no_decay")]
    return [
        {"name": name, "params": groups[name], "lr": rates[name.removesuffix("_no_decay")],
         "weight_decay": 0.0 if name.endswith("_no_decay") else float(weight_decay)}
        for name in order if name in groups
    ]
