"""What a plain ``pip install loraplug`` brings is enough, and the setup installs no more.

The full check builds the wheel and installs it alone into a fresh environment
(``make smoke``, run by CI); the tests here are the fast part of it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata as metadata
import json
import re
import shutil
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


# --------------------------------------------------------------------------- setup
def make_dry_run(target: str, tmp_path: Path) -> str:
    """The commands ``make TARGET`` runs on a machine without .venv, without running them."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run([make, "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def installs(commands: str) -> list[str]:
    return [line for line in commands.splitlines() if " install " in line and "-e " in line]


DEV_ONLY = {"pytest", "hypothesis", "ruff", "peft", "transformers", "mkdocs"}


def test_make_example_installs_only_the_examples_extra(tmp_path: Path) -> None:
    commands = make_dry_run("example", tmp_path)
    assert [line.split("-e ", 1)[1] for line in installs(commands)] == ["'.[examples]'"]
    assert "examples/goldfish.py" in commands.splitlines()[-1]
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert not requirement_names(extras["examples"]) & DEV_ONLY
    # The tests need the dev tools, and run the example too.
    test_installs = installs(make_dry_run("test", tmp_path))
    assert [line.split("-e ", 1)[1] for line in test_installs] == ["'.[dev,examples]'"]


def test_example_imports_only_what_its_extra_declares() -> None:
    """Every package the example's files import is declared by `examples` or the library."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = requirement_names(project["dependencies"]) \
        | requirement_names(project["optional-dependencies"]["examples"]) | {"loraplug"}
    owners = metadata.packages_distributions()
    local = {path.stem for path in (ROOT / "examples").glob("*.py")}
    imported = set()
    for path in (ROOT / "examples").glob("*goldfish*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local - {"__future__"}
    assert {"torch", "torchvision", "PIL", "tqdm", "numpy", "efficientnet_lite_pytorch"} \
        <= third_party
    for module in third_party:
        dists = {normalise(d) for d in owners.get(module, [module])}
        assert dists & declared, f"the example imports {module}, which nothing declares"


def test_ci_runs_the_readme_tests_and_the_wheel_smoke(tmp_path: Path) -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci and "make smoke" in ci
    assert "bash .ci/wheel_smoke.sh" in make_dry_run("smoke", tmp_path)
