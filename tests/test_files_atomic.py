"""Atomic saves: an interrupted or killed save leaves the previous adapter readable and intact."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from strategies import randomize_adapters
from torch import nn

import loraplug as lp
from loraplug import _save

ROOT = Path(__file__).resolve().parents[1]


def small_model() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    model = copy.deepcopy(base)
    lp.inject_lora(model, target="*", rank=4)
    randomize_adapters(model)
    return base, model


class Interrupted(BaseException):
    """Like KeyboardInterrupt: not an Exception, so only a bare cleanup path catches it."""


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_failure_while_writing_keeps_the_old_files(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = small_model()
    lp.save_adapter(model, tmp_path)
    before = files_of(tmp_path)

    def half_write(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"partial")
        raise Interrupted  # anything, even a BaseException, mid-write

    monkeypatch.setattr(_save, "save_file", half_write)
    with pytest.raises(Interrupted):
        lp.save_merged(model, tmp_path / "adapter_model.safetensors")
    assert files_of(tmp_path) == before  # same names (no temp files left), same bytes

    def failing(tensors, metadata=None):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(_save, "serialize", failing)
    with pytest.raises(MemoryError):
        lp.save_adapter(model, tmp_path)
    assert files_of(tmp_path) == before

    monkeypatch.undo()
    monkeypatch.setattr(os, "write", lambda fd, data: os.ftruncate(fd, 5) or 1 // 0)
    with pytest.raises(ZeroDivisionError):
        lp.save_adapter(model, tmp_path)
    assert files_of(tmp_path) == before


def test_failed_rename_reports_and_cleans_up(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = small_model()
    lp.save_adapter(model, tmp_path)
    before = files_of(tmp_path)

    def no_rename(src, dst):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(lp.AdapterFileError, match=r"save_adapter could not write .*Permission "
                                                  r"denied. Each file is either the old or the "
                                                  r"new one"):
        lp.save_adapter(model, tmp_path)
    assert files_of(tmp_path) == before


def test_written_files_follow_the_umask_not_the_temp_file_mode(tmp_path: Path) -> None:
    _, model = small_model()
    lp.save_adapter(model, tmp_path)
    probe = tmp_path / "probe"
    probe.write_text("")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"] == modes["probe"]


SAVER = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    import loraplug as lp

    path, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    # A large adapter (about 200 MB), so that writing it takes a while.
    lp.inject_lora(model, target="*", rank=100_000)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    if mode == "rename":
        def stall(src, dst):
            print("RENAMING", flush=True)
            time.sleep(60)
        os.replace = stall
    print("SAVING", flush=True)
    lp.save_adapter(model, path)
    print("DONE", flush=True)
""")


def _kill_while_saving(path: Path, mode: str) -> list[Path]:
    script = path.parent / "saver.py"
    script.write_text(SAVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(script), str(path), mode], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "SAVING", line
        deadline = time.monotonic() + 120
        if mode == "write":
            # Kill as soon as the new weights file has begun to grow.
            while time.monotonic() < deadline:
                temps = [p for p in path.iterdir() if p.name.endswith(".tmp")]
                if any(p.stat().st_size > 0 for p in temps):
                    break
                time.sleep(0.0005)
        else:
            line = proc.stdout.readline()
            assert line.strip() == "RENAMING", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return [p for p in path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["write", "rename"])
def test_sigkill_during_save_leaves_the_previous_adapter(tmp_path: Path, mode: str) -> None:
    base, model = small_model()
    path = tmp_path / "adapter"
    lp.save_adapter(model, path)
    before = files_of(path)

    temps = _kill_while_saving(path, mode)
    full_size = 2 * 4 * 64 * 100_000 * 4  # A and B of 4 layers, float32
    sizes = sorted(p.stat().st_size for p in temps)
    if mode == "write":  # killed mid-write: one partial weights file
        assert len(temps) == 1 and 0 < sizes[0] < full_size
    else:  # killed after both files were complete, before the renames
        assert len(temps) == 2 and sizes[1] > full_size

    assert {n: b for n, b in files_of(path).items() if not n.endswith(".tmp")} == before
    fresh = copy.deepcopy(base)
    lp.load_adapter(fresh, path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------- concurrent saves
def two_adapters() -> tuple[nn.Module, nn.Module, nn.Module]:
    """A base and two adapted copies whose configs differ (alpha 2 and 8)."""
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    adapted = []
    for alpha in (2, 8):
        model = copy.deepcopy(base)
        lp.inject_lora(model, target="*", rank=2, alpha=alpha)
        randomize_adapters(model)
        adapted.append(model)
    return base, adapted[0], adapted[1]


class Pausing:
    """``os.replace`` that pauses thread ``who`` after its first rename, holding its lock."""

    def __init__(self, who: str, pause: float) -> None:
        self.real, self.who, self.pause = os.replace, who, pause
        self.order: list[str] = []
        self.first_done = threading.Event()

    def __call__(self, src, dst) -> None:  # type: ignore[no-untyped-def]
        self.real(src, dst)
        name = threading.current_thread().name
        self.order.append(name)
        if name == self.who and self.order.count(name) == 1:
            self.first_done.set()
            time.sleep(self.pause)


def in_thread(name: str, errors: list[BaseException], fn, *args) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            fn(*args)
        except BaseException as err:  # reported by the test
            errors.append(err)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def loads_cleanly(base: nn.Module, path: Path) -> nn.Module:
    """Load with every warning an error: a mixed pair would warn "different saves"."""
    fresh = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.load_adapter(fresh, path)
    return fresh


def test_concurrent_saves_to_one_directory_leave_one_whole_adapter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first save pauses between its two renames; unlocked, the second save's renames
    # fell into that gap and left its weights beside the first save's config.
    base, first, second = two_adapters()
    pausing = Pausing("first", pause=0.5)
    monkeypatch.setattr(os, "replace", pausing)
    errors: list[BaseException] = []
    one = in_thread("first", errors, lp.save_adapter, first, tmp_path)
    assert pausing.first_done.wait(60)
    two = in_thread("second", errors, lp.save_adapter, second, tmp_path)
    one.join(60), two.join(60)
    assert not errors
    assert pausing.order == ["first", "first", "second", "second"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loads_cleanly(base, tmp_path)(x), second(x))


def test_a_load_during_a_save_reads_one_whole_adapter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, first, second = two_adapters()
    lp.save_adapter(first, tmp_path)
    pausing = Pausing("writer", pause=0.5)
    monkeypatch.setattr(os, "replace", pausing)
    errors: list[BaseException] = []
    loaded: list[nn.Module] = []
    writer = in_thread("writer", errors, lp.save_adapter, second, tmp_path)
    assert pausing.first_done.wait(60)  # new weights in place, old config still there
    reader = in_thread("reader", errors, lambda: loaded.append(loads_cleanly(base, tmp_path)))
    writer.join(60), reader.join(60)
    assert not errors
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded[0](x), second(x))


WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import loraplug as lp

    path, alpha, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)])
    lp.inject_lora(model, target="*", rank=8, alpha=alpha)
    torch.manual_seed(alpha)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    print("READY", flush=True)
    sys.stdin.readline()
    for _ in range(rounds):
        lp.save_adapter(model, path)
""")


@pytest.mark.slow
def test_processes_saving_to_one_directory_never_mix_their_files(tmp_path: Path) -> None:
    # Two processes save different adapters (alpha 2 and 8) to one directory 40 times each
    # while this one loads it over and over: every load sees one writer's whole adapter.
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(script), str(path), alpha, "40"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for alpha in ("2", "8")]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        torch.manual_seed(0)
        base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)])
        loads = 0
        while any(proc.poll() is None for proc in procs):
            if (path / "adapter_config.json").exists():
                alphas = {layer.alpha["default"]
                          for layer in loads_cleanly(base, path).modules()
                          if isinstance(layer, lp.LoRALayer)}
                assert alphas in ({2.0}, {8.0})
                loads += 1
        assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
    assert loads > 0
    assert loads_cleanly(base, path) is not None
