"""What a plain ``pip install loraplug`` brings is enough, and the setup installs no more.

The full check builds the wheel and installs it alone into a fresh environment
(``make smoke``, run by CI); the tests here are the fast part of it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Packages outside the allowed set (argv[1]) cannot be imported, as on a machine where
# only loraplug's declared dependencies are installed; then everything a user does with
# the library alone: inject, train, save, load, merge, and the command line.
USE_EVERYTHING = r"""
import json, sys

ALLOWED = set(json.loads(sys.argv[1]))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED or top in sys.modules:
            return None
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NotInstalled())

import torch
from torch import nn
import loraplug as lp
from loraplug._cli import main
from safetensors.torch import save_file


def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2), nn.Embedding(5, 2))


model = net()
save_file(model.state_dict(), "base.safetensors")
lp.inject_lora(model, target=["0", "2", "3"], rank=2)
hidden = model[2](model[1](model[0](torch.randn(1, 3, 4, 4))))
(hidden.sum() + model[3](torch.tensor([1])).sum()).backward()
lp.save_adapter(model, "adapter")
lp.load_adapter(model, "adapter", name="again")
lp.merge(model)
lp.save_merged(model, "merged.safetensors")
sys.modules["smoke_models"] = type(sys)("smoke_models")
sys.modules["smoke_models"].net = net
assert main(["inspect", "adapter"]) == 0
assert main(["targets", "smoke_models:net", "-t", "2"]) == 0
assert main(["merge", "--model", "smoke_models:net", "--weights", "base.safetensors",
             "--adapter", "adapter", "--out", "cli_merged.safetensors"]) == 0
"""


def requirement_names(requirements: list[str] | None) -> set[str]:
    """Distribution names from requirement strings, leaving out those of extras."""
    names = set()
    for requirement in requirements or []:
        if "extra ==" in requirement.replace('"', "'"):
            continue
        names.add(normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group()))
    return names


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return requirement_names(project["dependencies"])


def requirement_closure(name: str) -> set[str]:
    """``name`` and everything it requires, as installed here."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        with contextlib.suppress(metadata.PackageNotFoundError):
            todo.extend(requirement_names(metadata.requires(current)))
    return seen


def test_declared_dependencies_are_enough(tmp_path: Path) -> None:
    """With only the declared dependencies (and what they require) importable, all works.

    safetensors writes torch tensors through numpy, and torch does not depend on numpy:
    before numpy was declared, a plain install could not save, and torch warned
    "Failed to initialize NumPy" on every run.
    """
    declared = declared_dependencies()
    assert {"torch", "safetensors", "numpy"} <= declared
    allowed = {"loraplug"}.union(*(requirement_closure(name) for name in declared))
    modules = [module for module, dists in metadata.packages_distributions().items()
               if any(normalise(dist) in allowed for dist in dists)]
    result = subprocess.run([sys.executable, "-c", USE_EVERYTHING, json.dumps(modules)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Failed to initialize NumPy" not in result.stderr
