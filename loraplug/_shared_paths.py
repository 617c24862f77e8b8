"""Modules reachable at several paths (``b = a`` in ``__init__``), in adapter files.

A shared module is one object, so it carries one adapter, however many paths reach it.
PEFT visits it once and saves it under its first path; a file may still name it under
several paths, which is fine only when they agree.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch
from torch import Tensor


class Planned(Protocol):
    """What loading plans for one path: the module, its hyperparameters, A and B."""

    @property
    def module(self) -> object: ...  # a module, or a bare parameter's target
    @property
    def spec(self) -> object: ...
    @property
    def a(self) -> Tensor: ...
    @property
    def b(self) -> Tensor: ...


P = TypeVar("P", bound=Planned)


def shared_module_problems(plan: dict[str, P]) -> list[str]:
    """A module reachable at several paths carries one adapter: the file may give it
    tensors under more than one of them only if they are the same. The extra paths are
    dropped from ``plan``; differing tensors are a problem."""
    first: dict[int, str] = {}
    problems = []
    for path in sorted(plan):
        owner = first.setdefault(id(plan[path].module), path)
        if owner == path:
            continue
        kept, item = plan[owner], plan.pop(path)
        same = kept.spec == item.spec and all(
            x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            for x, y in ((kept.a, item.a), (kept.b, item.b)))
        if not same:
            problems.append(
                f"{owner} and {path} are one module (the same object at both paths), which "
                "carries one adapter, but the file gives it different tensors or "
                f"hyperparameters under each path. Keep one path's keys in the file (remove "
                f"those of {path}), or make them separate modules in the model."
            )
    return problems
