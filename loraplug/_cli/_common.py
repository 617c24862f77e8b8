"""What the subcommands share: errors, model building, patterns, tables."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


class CLIError(Exception):
    """A failure to report in one line, with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def one_line(message: str) -> str:
    """A message's lines as one: sentences run on, list items are joined with "; "."""
    parts = [line.strip().removeprefix("- ").strip() for line in str(message).splitlines()]
    text = ""
    for part in filter(None, parts):
        if text:
            text += " " if text.endswith((".", ":", "?", "!")) else "; "
        text += part
    return text


class Parser(argparse.ArgumentParser):
    # argparse prints the usage block before its error; one line is easier to read.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)", code=2)


# --------------------------------------------------------------------------- models
@contextlib.contextmanager
def _current_directory_first() -> Iterator[None]:
    # `python -m loraplug` imports from the current directory and the console script
    # would not (its sys.path starts with its bin/ directory): both look there first.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def build_model(spec: str, *, meta: bool = False) -> nn.Module:
    """Build the model ``spec`` names: ``torchvision:NAME`` or ``package.module:callable``.

    ``package.module`` is imported from the current directory first, then from the
    installed packages. With ``meta``, the model is first built on the meta device
    (shapes only: fast, no memory); a builder that cannot run there is built on the CPU
    instead.
    """
    with _current_directory_first():
        return _build_model(spec, meta=meta)


def _build_model(spec: str, *, meta: bool) -> nn.Module:
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise CLIError(
            f"MODEL {spec!r} is not torchvision:NAME or package.module:callable, e.g. "
            "torchvision:resnet18 or mypackage.models:build_model", code=2)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError as err:
            raise CLIError("torchvision:NAME needs torchvision: pip install torchvision") from err
        available = torchvision.models.list_models()
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, available, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                "; torchvision.models.list_models() lists them"
            raise CLIError(f"torchvision has no model {name!r}{hint}", code=2)

        def builder() -> object:
            return torchvision.models.get_model(name, weights=None)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            reason = str(err)
            if isinstance(err, ModuleNotFoundError) and err.name == source.partition(".")[0]:
                reason = (f"no module {err.name!r} in the current directory ({os.getcwd()}) "
                          "or the installed packages")
            raise CLIError(f"cannot import {source!r} for MODEL {spec!r}: {reason}") from err
        obj: object = module
        for part in name.split("."):
            if not hasattr(obj, part):
                raise CLIError(f"{source} has no attribute {name!r} (MODEL {spec!r})")
            obj = getattr(obj, part)
        if isinstance(obj, nn.Module):
            return obj
        if not callable(obj):
            raise CLIError(f"{spec} is a {type(obj).__name__}; expected a callable that "
                           "returns an nn.Module, or an nn.Module")
        builder = obj
    model = None
    if meta:
        try:
            with torch.device("meta"):
                model = builder()
        except Exception:  # a builder that loads or computes data: build it for real
            model = None
    if model is None:
        try:
            model = builder()
        except Exception as err:
            raise CLIError(f"building {spec} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned a {type(model).__name__}; expected an nn.Module")
    return model


def parse_pattern(text: str) -> str | re.Pattern[str] | type[nn.Module]:
    """A command-line target: a glob, ``re:REGEX`` or ``type:CLASS``."""
    if text.startswith("re:"):
        try:
            return re.compile(text[3:])
        except re.error as err:
            raise CLIError(f"--target {text!r}: not a regular expression ({err})", code=2) from err
    if text.startswith("type:"):
        name = text[5:]
        dotted = name.removeprefix("torch.").removeprefix("nn.")
        if hasattr(nn, dotted) and isinstance(getattr(nn, dotted), type):
            return getattr(nn, dotted)
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name) if module_name else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise CLIError(f"--target {text!r}: {name!r} is not a module class; use e.g. "
                           "type:Linear, type:nn.Conv2d or type:package.module.Class", code=2)
        return cls
    return text


# --------------------------------------------------------------------------- targets
def weight_shape(module: nn.Module) -> str:
    from .._quantized import logical_shape

    weight = module._parameters.get("weight")
    tensors = [weight] if weight is not None else list(module.parameters(recurse=False))
    if weight is not None:
        return "×".join(map(str, logical_shape(module)))  # a quantized weight's, not packed
    return "×".join(map(str, tensors[0].shape)) if tensors else ""


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def byte_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def count_of(n: int, noun: str) -> str:
    """``1 layer``, ``2 layers``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def dims(t: Tensor) -> str:
    return "×".join(map(str, t.shape))
