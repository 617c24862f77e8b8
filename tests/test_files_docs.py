"""The code in docs/files.md, docs/migrating.md, docs/transformers.md and docs/qlora.md runs
as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


#: Pages whose code needs a package it does not import itself -> those packages.
NEEDS = {"qlora.md": ("bitsandbytes",)}


@pytest.mark.parametrize("name", ["files.md", "migrating.md", "transformers.md", "qlora.md"])
def test_documented_code_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(name)
    assert blocks
    for package in ("peft", "transformers", "torchao"):
        if any(re.search(rf"^(from|import) {package}\b", b, re.M) for b in blocks):
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
            pytest.importorskip(package)
    for package in NEEDS.get(name, ()):
        pytest.importorskip(package, reason=f"{name} needs {package}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:  # one namespace: later blocks build on earlier ones
        exec(compile(block, f"{name}", "exec"), namespace)
