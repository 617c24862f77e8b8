"""DDP and FSDP2 on real process groups: gloo on 127.0.0.1, launched with torchrun.

The slow tests start ``torchrun --standalone --nproc-per-node 2`` on this file (its
``__main__`` is the worker) or on ``examples/distributed_finetune.py``; workers write
their results to a temporary directory and this process compares them with a
single-process run of the same training on the same global batches. Every launch has a
timeout, and its processes are stopped (torchrun, then each worker's process group)
whether the test passes, fails or is interrupted.

The fast tests run FSDP2 in a one-process group inside this process.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import loraplug as lp
from loraplug._distributed import gather_full, is_sharded, run_on_main

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, LR = 5, 8, 1e-2


# --------------------------------------------------------------------------- the model
class Net(nn.Module):
    """Embedding → Conv1d → Linear, mean over positions: every layer type trains."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 4)
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        return self.fc(torch.tanh(h)).mean(dim=1)


def _base() -> Net:
    torch.manual_seed(0)
    return Net()


def _model() -> Net:
    model = _base()
    lp.inject_lora(model, target=["emb", "conv", "fc"], rank=2, alpha=4.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B (A for the embedding) starts at zero: give every tensor values
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 20, (BATCH, 6), generator=gen), torch.randn(BATCH, 4, generator=gen))
            for _ in range(STEPS)]


def _adapter_names(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _train(model: nn.Module, forward: nn.Module, rank: int = 0, world: int = 1) -> None:
    """STEPS of AdamW; process ``rank`` takes its contiguous share of each global batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    share = BATCH // world
    for ids, target in _batches():
        rows = slice(rank * share, (rank + 1) * share)
        loss = F.mse_loss(forward(ids[rows]), target[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _single_process_adapter() -> dict[str, torch.Tensor]:
    model = _model()
    _train(model, model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _assert_adapters_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- workers
def _worker_ddp(out: Path) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    reduced: set[str] = set()

    # No annotations: DDP checks them, and this file's are strings (future annotations).
    def record(state, bucket):  # type: ignore[no-untyped-def]
        reduced.update(names[id(p)] for p in bucket.parameters())
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, record)
    _train(model, ddp, rank, world)
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and
                    p.grad is not None]
    save_file({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
              str(out / f"adapter.{rank}.safetensors"))
    (out / f"ddp.{rank}.json").write_text(json.dumps({
        "reduced": sorted(reduced), "frozen_grads": frozen_grads,
        "find_unused_parameters": ddp.find_unused_parameters,
    }))

    # A second adapter that forward never computes gets no gradient: DDP stops at the
    # next iteration (peft#951) unless it is frozen, as docs/scaling.md shows.
    _ddp_stops_on_an_unused_adapter(rank, world)
    two = _model()
    lp.inject_lora(two, target=["emb", "conv", "fc"], rank=2, name="other")
    training = "default"
    for name, p in two.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.requires_grad_(name.endswith("." + training))
    _train(two, nn.parallel.DistributedDataParallel(two), rank, world)
    save_file({n: p.detach() for n, p in two.named_parameters() if p.requires_grad},
              str(out / f"frozen_other.{rank}.safetensors"))


def _ddp_stops_on_an_unused_adapter(rank: int, world: int) -> None:
    two = _model()
    lp.inject_lora(two, target=["emb", "conv", "fc"], rank=2, name="other")
    broken = nn.parallel.DistributedDataParallel(two)
    with pytest.raises(RuntimeError, match="Expected to have finished reduction"):
        _train(two, broken, rank, world)
    del broken  # its reducer waits for gradients that never come: drop it now
    gc.collect()
    dist.barrier()


def _worker_fsdp2(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    # Frozen W and trainable A, B share each unit: what FSDP1 refused (pytorch#100945).
    fully_shard(model.conv, mesh=mesh)
    fully_shard(model.fc, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(is_sharded(p) for p in model.parameters())
    _train(model, model, rank, world)
    trained = {n: gather_full(p) for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        save_file(trained, str(out / "trained.safetensors"))

    local = {n: p.to_local().clone() for n, p in model.named_parameters()}
    with pytest.raises(lp.StateError, match=r"merge: layers \['emb', 'conv', 'fc'\].*FSDP2"):
        lp.merge(model)
    with pytest.raises(lp.StateError, match="sharded by FSDP2"):
        lp.merge(model, safe=True)
    with pytest.raises(lp.StateError, match=r"unmerge: .*sharded by FSDP2"):
        lp.unmerge(model)
    assert all(torch.equal(p.to_local(), local[n]) for n, p in model.named_parameters())
    assert not any(m.merged for m in model.modules() if isinstance(m, lp.LoRALayer))

    lp.save_adapter(model, out / "adapter")  # every rank calls; rank 0 writes
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # on return, everywhere
    probe = torch.arange(12).reshape(2, 6) % 20
    with torch.no_grad():
        result = model(probe)  # a collective: every rank runs it
    if rank == 0:
        save_file({"out": result}, str(out / "probe.safetensors"))

    blocker = out / "blocker"  # a file where the adapter directory should go
    if rank == 0:
        blocker.write_text("not a directory")
    dist.barrier()
    expected = "cannot create directory" if rank == 0 else "process 0 failed to write"
    with pytest.raises(lp.AdapterFileError, match=expected):
        lp.save_adapter(model, blocker / "adapter")
    (out / f"done.{rank}").write_text("ok")


def _worker_crash(out: Path) -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 waits for a peer that is gone


def _worker_hang(out: Path) -> None:
    time.sleep(600)


def _worker_main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    (out / f"pid.{dist.get_rank()}").write_text(str(os.getpid()))
    {"ddp": _worker_ddp, "fsdp2": _worker_fsdp2, "crash": _worker_crash,
     "hang": _worker_hang}[mode](out)
    dist.barrier()  # no process leaves while another still talks to it
    dist.destroy_process_group()


# --------------------------------------------------------------------------- launching
def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


class TorchRun:
    """``torchrun --standalone --nproc-per-node 2 SCRIPT ARGS``, stopped on exit, always."""

    def __init__(self, script: Path, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        if Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections over 127.0.0.1
        # --standalone: a local rendezvous on a free port that torchrun picks itself.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(script), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.workers: set[int] = set()
        self._chunks: list[str] = []
        # Drain the pipe as it fills, or a chatty run would block on a full pipe.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._chunks.append(line)

    def wait(self, timeout: float) -> str:
        """The output once torchrun exits with 0; fails the test on error or timeout."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.workers.update(_children(self.proc.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.5)
        if self.proc.poll() is None:
            self.stop()
            pytest.fail(f"torchrun did not finish within {timeout:.0f} s and was stopped; "
                        f"output:\n{self.output()[-6000:]}")
        out = self.output()
        if self.proc.returncode:
            pytest.fail(f"torchrun exited with {self.proc.returncode}; output:\n{out[-6000:]}")
        return out

    def output(self) -> str:
        if self.proc.poll() is not None:
            self._reader.join(timeout=15)
        return "".join(self._chunks)

    def stop(self) -> None:
        """SIGTERM to torchrun (it stops its workers), then SIGKILL to whatever is left."""
        if self.proc.poll() is None:
            self.workers.update(_children(self.proc.pid))
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        # Each worker leads its own session (torchrun starts them so): kill its group.
        for pid in [self.proc.pid, *self.workers]:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)

    def __enter__(self) -> TorchRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _launch(mode: str, out: Path) -> Iterator[TorchRun]:
    with TorchRun(Path(__file__), mode, str(out)) as run:
        yield run


def _pids(out: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(out.glob("pid.*"))]


# --------------------------------------------------------------------------- slow tests
@pytest.mark.slow
def test_ddp_reduces_only_adapter_gradients_and_matches_one_process(tmp_path: Path) -> None:
    with _launch("ddp", tmp_path) as run:
        run.wait(timeout=240)
    model = _model()
    adapters = _adapter_names(model)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"ddp.{rank}.json").read_text())
        assert report["reduced"] == adapters  # the frozen base never enters a bucket
        assert report["frozen_grads"] == []
        assert report["find_unused_parameters"] is False
    replicas = [load_file(str(tmp_path / f"adapter.{rank}.safetensors")) for rank in (0, 1)]
    for name in adapters:
        assert torch.equal(replicas[0][name], replicas[1][name])
    reference = _single_process_adapter()
    _assert_adapters_close(replicas[0], reference)
    # With the unused adapter frozen, the same adapter trains as with one adapter.
    _assert_adapters_close(load_file(str(tmp_path / "frozen_other.1.safetensors")), reference)


@pytest.mark.slow
def test_fsdp2_trains_saves_from_rank0_and_refuses_merge(tmp_path: Path) -> None:
    with _launch("fsdp2", tmp_path) as run:
        run.wait(timeout=240)
    assert (tmp_path / "done.0").exists() and (tmp_path / "done.1").exists()
    trained = load_file(str(tmp_path / "trained.safetensors"))
    _assert_adapters_close(trained, _single_process_adapter())

    # The saved directory loads on one process, with the sharded model's tensors and outputs.
    single = _base()
    assert lp.load_adapter(single, tmp_path / "adapter") == ["conv", "emb", "fc"]
    for name, tensor in trained.items():
        assert torch.equal(single.get_parameter(name).detach(), tensor)
    probe = torch.arange(12).reshape(2, 6) % 20
    with torch.no_grad():
        torch.testing.assert_close(single(probe), load_file(str(tmp_path / "probe.safetensors"))
                                   ["out"], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "blocker" / "adapter").exists()


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "distributed_finetune", ROOT / "examples" / "distributed_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_example_trains_the_same_adapter_as_one_process(tmp_path: Path, strategy: str) -> None:
    args = ["--steps", "20", "--seed", "3"]
    with TorchRun(ROOT / "examples" / "distributed_finetune.py", "--strategy", strategy,
                  "--out", str(tmp_path / strategy), *args) as run:
        output = run.wait(timeout=240)
    assert f"{strategy}, 2 processes: 100%" in output  # rank 0's progress bar, once
    assert output.count("held-out loss") == 1
    example = _load_example()
    threads = torch.get_num_threads()
    try:
        held_out = example.main([*args, "--out", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(threads)
    loaded = {}
    for run_name in (strategy, "single"):
        model = example.build_base(3)
        lp.load_adapter(model, tmp_path / run_name)
        loaded[run_name] = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    _assert_adapters_close(loaded[strategy], loaded["single"])
    assert f"held-out loss {held_out:.5f} with the adapter" in output


@pytest.mark.slow
def test_a_failing_rank_stops_the_group_and_leaves_no_process(tmp_path: Path) -> None:
    with _launch("crash", tmp_path) as run, \
            pytest.raises(pytest.fail.Exception, match="rank 1 fails on purpose"):
        run.wait(timeout=240)
    pids = _pids(tmp_path)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.slow
def test_a_hanging_group_is_stopped_at_its_timeout(tmp_path: Path) -> None:
    with _launch("hang", tmp_path) as run:
        deadline = time.monotonic() + 120
        while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        with pytest.raises(pytest.fail.Exception, match="did not finish within 1 s"):
            run.wait(timeout=1)
        pids = _pids(tmp_path)
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in [run.proc.pid, *pids])


# --------------------------------------------------------------------------- fast tests
@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_model_refuses_merge_and_saves_a_loadable_adapter(
    one_process_group: None, tmp_path: Path,
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    plain = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    assert is_sharded(model.fc.weight) and is_sharded(model.fc.lora_A["default"])
    weights = {n: p.to_local().clone() for n, p in model.named_parameters()}
    with pytest.raises(lp.StateError, match=r"merge: layers \['emb', 'conv', 'fc'\] hold "
                                            r"parameters sharded by FSDP2.*nothing was changed"):
        lp.merge(model)
    with pytest.raises(lp.StateError, match=r"unmerge: .*load_adapter"):
        lp.unmerge(model)
    with pytest.raises(lp.StateError, match=r"unload\(merge=True\): layers \['emb'"):
        lp.unload(model, merge=True)
    with pytest.raises(lp.StateError, match=r"save_merged: .*sharded by FSDP2"):
        lp.save_merged(model, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()
    assert isinstance(model.fc, lp.LoRALayer)
    assert all(torch.equal(p.to_local(), weights[n]) for n, p in model.named_parameters())

    lp.save_adapter(model, tmp_path / "adapter")
    fresh = _base()
    lp.load_adapter(fresh, tmp_path / "adapter")
    ids = torch.arange(12).reshape(2, 6) % 20
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), plain(ids), rtol=0, atol=0)
        torch.testing.assert_close(model(ids), plain(ids))


def test_plain_models_are_written_by_the_calling_process(tmp_path: Path) -> None:
    model = _model()
    weight = model.fc.lora_A["default"]
    full = gather_full(weight)
    assert not full.requires_grad and full.data_ptr() == weight.data_ptr()
    calls: list[int] = []
    run_on_main(model, lambda: calls.append(1))  # no process group: no collective
    assert calls == [1]
    with pytest.raises(OSError, match="disk full"):
        run_on_main(model, lambda: (_ for _ in ()).throw(OSError("disk full")))


if __name__ == "__main__":
    _worker_main()
