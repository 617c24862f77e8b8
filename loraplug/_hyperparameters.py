"""Checking the hyperparameters of an adapter: its name, rank, alpha, dropout and flags."""

from __future__ import annotations

from ._adapter_set import usable_name
from ._bounded import ALPHA_RANGE, MAX_RANK, alpha_ok, rank_ok
from ._bounded import short_repr as _short
from ._errors import ConfigError


def validate_name(name: object) -> str:
    """Check an adapter name: any non-empty string without dots that torch can use as a key.

    Raises:
        ConfigError: ``name`` is not such a string.
    """
    if not usable_name(name):
        raise ConfigError(
            f"adapter name must be a non-empty string without dots that is not an attribute "
            f"of nn.ModuleDict or nn.ParameterDict (such as 'keys', 'copy' or 'training'); "
            f"received {name!r}. Use names like 'default', 'style_b' or 'adapter-2'."
        )
    return str(name)


def validate_hyperparameters(
    *, rank: object, alpha: object, dropout: object, name: object, init: object
) -> tuple[int, float, float, str, str]:
    """Check the hyperparameters shared by every layer; returns them normalised.

    Raises:
        ConfigError: a value is of the wrong type or out of range.
    """
    if not rank_ok(rank):
        raise ConfigError(
            f"rank must be a positive int; received {_short(rank)}. Typical ranks are 4 to "
            f"64, e.g. rank=8 (at most {MAX_RANK})."
        )
    if alpha is None:
        alpha = rank
    if not alpha_ok(alpha):
        raise ConfigError(
            f"alpha must be a finite number > 0; received {_short(alpha)}. The scaling is "
            "alpha / rank, computed in the weights' dtype, so alpha must fit a float32 "
            f"({ALPHA_RANGE[0]:.4g} to {ALPHA_RANGE[1]:.4g}); alpha=None means alpha = rank "
            "(scaling 1)."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ConfigError(
            f"dropout must be a number in [0, 1); received {_short(dropout)}. Use 0.0 for "
            "none, e.g. dropout=0.05."
        )
    name = validate_name(name)
    if init not in ("kaiming", "gaussian"):
        raise ConfigError(
            f"init must be 'kaiming' or 'gaussian'; received {init!r}."
        )
    return rank, float(alpha), float(dropout), name, str(init)


def check_flags(**flags: object) -> None:
    """Check that each flag is True or False (not a truthy string such as "no").

    Raises:
        ConfigError: a flag is something else.
    """
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} must be True or False; received {value!r}.")
