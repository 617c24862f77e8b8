"""The ``path`` argument of the functions that read and write files."""

from __future__ import annotations

import os
import reprlib
from pathlib import Path

from ._errors import ConfigError


def as_path(path: object, action: str) -> Path:
    """``path`` as a ``Path``, checked to be a non-empty ``str`` or ``os.PathLike``.

    Raises:
        ConfigError: ``path`` is something else (``None``, a number, a list, ``""``).
    """
    if isinstance(path, (str, os.PathLike)) and not isinstance(os.fspath(path), bytes) \
            and os.fspath(path) != "":
        return Path(path)
    raise ConfigError(
        f"{action}: path must be a non-empty str or pathlib.Path; received "
        f"{type(path).__name__} {reprlib.repr(path)}. Pass e.g. 'adapters/my_adapter'."
    )
