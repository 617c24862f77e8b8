"""bitsandbytes and torchao are optional: loraplug never imports them until a model holds
one of their layers or weights, and works as before without them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN_USE = """
    import torch
    from torch import nn
    import loraplug as lp
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lp.inject_lora(model, target=nn.Linear, rank=2)
    lp.prepare_for_kbit_training(model, gradient_checkpointing=False)
    str(lp.summary(model))
    assert lp.merge(model) is None
    lp.unmerge(model)
    lp.unload(model)
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_importing_and_using_loraplug_imports_no_quantization_package() -> None:
    proc = _run(PLAIN_USE + """
    import sys
    loaded = [m for m in ("bitsandbytes", "torchao", "transformers") if m in sys.modules]
    assert not loaded, loaded
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_loraplug_works_where_the_packages_cannot_be_imported() -> None:
    proc = _run("""
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("bitsandbytes", "torchao"):
                raise ImportError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Missing())
    """ + PLAIN_USE)
    assert proc.returncode == 0, proc.stderr[-3000:]
