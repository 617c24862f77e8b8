"""The code in docs/peft_features.md runs as written, in order, in one namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_files_docs import python_blocks


def test_documented_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks("peft_features.md")
    assert blocks
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "peft_features.md", "exec"), namespace)
