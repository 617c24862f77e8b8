"""Validation of the hyperparameters every adapter shares."""

from __future__ import annotations

import math

from torch import nn

from ._errors import ConfigError

# Adapters are keys of these containers; torch refuses keys that shadow their attributes.
_CONTAINERS = (nn.ModuleDict(), nn.ParameterDict())


def validate_name(name: object) -> str:
    """Check an adapter name: any non-empty string without dots that torch can use as a key.

    Raises:
        ConfigError: ``name`` is not such a string.
    """
    if not isinstance(name, str) or not name or "." in name \
            or any(hasattr(c, name) for c in _CONTAINERS):
        raise ConfigError(
            f"adapter name must be a non-empty string without dots that is not an attribute "
            f"of nn.ModuleDict or nn.ParameterDict (such as 'keys', 'copy' or 'training'); "
            f"received {name!r}. Use names like 'default', 'style_b' or 'adapter-2'."
        )
    return name


def validate_hyperparameters(
    *, rank: object, alpha: object, dropout: object, name: object, init: object
) -> tuple[int, float, float, str, str]:
    """Check the hyperparameters shared by every layer; returns them normalised.

    Raises:
        ConfigError: a value is of the wrong type or out of range.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(
            f"rank must be a positive int; received {rank!r}. Typical ranks are 4 to 64, "
            "e.g. rank=8."
        )
    if alpha is None:
        alpha = rank
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 \
            or not math.isfinite(alpha):
        raise ConfigError(
            f"alpha must be a finite number > 0; received {alpha!r}. The scaling is "
            f"alpha / rank; alpha=None means alpha = rank (scaling 1)."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ConfigError(
            f"dropout must be a number in [0, 1); received {dropout!r}. Use 0.0 for none, "
            "e.g. dropout=0.05."
        )
    validate_name(name)
    if init not in ("kaiming", "gaussian"):
        raise ConfigError(
            f"init must be 'kaiming' or 'gaussian'; received {init!r}."
        )
    return rank, float(alpha), float(dropout), name, str(init)
