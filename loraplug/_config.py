"""Validation of the hyperparameters every adapter shares."""

from __future__ import annotations

import math

from ._errors import ConfigError
from ._inits import check_init


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
    if not isinstance(name, str) or not name or "." in name or not name.isidentifier():
        raise ConfigError(
            f"adapter name must be a non-empty identifier without dots; received {name!r}. "
            "Use names like 'default' or 'style_b'."
        )
    return rank, float(alpha), float(dropout), name, check_init(init)
