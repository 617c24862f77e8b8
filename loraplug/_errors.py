"""Exceptions and warnings raised by loraplug.

Every error is a :class:`LoRAError`, so ``except loraplug.LoRAError`` catches all of
them; the subclasses also derive from the built-in type a caller would expect
(``ValueError``, ``KeyError``-like lookups raise :class:`AdapterError`, a
``LookupError``).  Messages name the module path, what was received, what was
expected and what to do.
"""

from __future__ import annotations


class LoRAError(Exception):
    """Base class of every error raised by loraplug."""


class ConfigError(LoRAError, ValueError):
    """An argument is invalid: a hyperparameter, or an adapter name malformed or taken.

    A rank, alpha or dropout out of range or of the wrong type, a name torch cannot use
    as a key or one a target layer already carries (``inject_lora``), a ``model`` that is
    not a module, a ``path`` that is not a path.
    """


class TargetError(LoRAError, ValueError):
    """A target pattern matches nothing, or matches modules that cannot carry LoRA."""


class AdapterError(LoRAError, LookupError):
    """An adapter name is unknown to the model, or the names given are not names."""


class StateError(LoRAError, RuntimeError):
    """The operation does not fit the model's current state (merged, meta device, ...)."""


class AdapterFileError(LoRAError, ValueError):
    """An adapter file or state dict is malformed or does not fit the model."""


class LoRAWarning(UserWarning):
    """Something works but is probably not what was meant (a rank too large to help, ...)."""
