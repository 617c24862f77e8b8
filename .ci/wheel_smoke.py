"""A user's first steps with the installed wheel, run by .ci/wheel_smoke.sh.

Run from an empty directory, with the fresh environment's bin/ first on PATH. It writes
a model file there (mymodels.py), then: inject, a training step, save_adapter,
load_adapter, merge, save_merged, and the console script's targets, inspect and merge.
Any failure, traceback or "Failed to initialize NumPy" exits non-zero.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

MODEL_FILE = '''\
import torch
from torch import nn


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))
'''


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke: FAILED: {what}")
    print(f"  ok  {what}")


def console(*args: str) -> str:
    """Run the ``loraplug`` console script; return its output, failing on any error."""
    script = shutil.which("loraplug")
    check(script is not None and Path(script).parent == Path(sys.executable).parent,
          f"the loraplug console script is installed ({script})")
    done = subprocess.run([script, *args], capture_output=True, text=True, timeout=600)
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    check(done.returncode == 0 and "Traceback" not in done.stderr
          and "Failed to initialize NumPy" not in done.stderr,
          f"loraplug {' '.join(args)} (exit status {done.returncode})")
    return done.stdout


def main() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    import loraplug as lp

    here = Path.cwd()
    check(Path(lp.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()),
          f"loraplug is imported from the installed wheel ({lp.__file__})")
    (here / "mymodels.py").write_text(MODEL_FILE)
    sys.path.insert(0, str(here))
    from mymodels import net

    model = net()
    save_file(model.state_dict(), str(here / "base.safetensors"))
    wrapped = lp.inject_lora(model, target=["0", "3", "5"], rank=4, alpha=8)
    check(wrapped == ["0", "3", "5"], f"inject_lora wrapped {wrapped}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-2)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    before = model(x).detach()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimiser.step()
    after = model(x).detach()
    check(len(trainable) == 6 and not torch.equal(before, after), "one training step")

    lp.save_adapter(model, here / "adapter")
    fresh = net()
    lp.load_adapter(fresh, here / "adapter")
    check(torch.allclose(fresh(x), after, atol=1e-6), "save_adapter, then load_adapter")
    lp.merge(fresh)
    check(torch.allclose(fresh(x), after, atol=1e-5), "merge")
    lp.save_merged(model, here / "merged.safetensors")
    plain = net()
    plain.load_state_dict(load_file(str(here / "merged.safetensors")))
    check(torch.allclose(plain(x), after, atol=1e-5), "save_merged loads into the plain model")

    out = console("targets", "mymodels:net", "--target", "type:Linear", "--rank", "4")
    check("2 layers selected (*)" in out, "loraplug targets finds mymodels.py here")
    out = console("inspect", "adapter")
    check("3 layers" in out and "all finite." in out, "loraplug inspect")
    console("merge", "--model", "mymodels:net", "--weights", "base.safetensors",
            "--adapter", "adapter", "--out", "cli_merged.safetensors")
    plain = net()
    plain.load_state_dict(load_file(str(here / "cli_merged.safetensors")))
    check(torch.allclose(plain(x), after, atol=1e-5), "loraplug merge output loads and matches")
    print(f"wheel smoke: loraplug {lp.__version__}, torch {torch.__version__}, in {os.getcwd()}")


if __name__ == "__main__":
    main()
