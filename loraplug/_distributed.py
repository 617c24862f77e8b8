"""Adapters on models that ``torch.distributed`` shards: gathering, writing, refusing.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter, adapters
included, is a ``DTensor`` holding one shard per process. Reading an adapter whole is a
collective (every process must take part), and writing it is the job of one process.
Nothing here imports ``torch.distributed.tensor`` or ``torch.distributed.fsdp``: a
``DTensor`` or FSDP2 module can exist only once they have been imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from ._errors import AdapterFileError, StateError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a tensor spread over processes)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was sharded with FSDP2's ``fully_shard``."""
    module = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(module, "FSDPModule", None)
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def gather_full(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``, detached: gathered from every process if it is a DTensor.

    For a DTensor this is a collective: every process of its mesh must call it, with
    the tensors in the same order. A plain tensor is returned detached, as it is.
    """
    tensor = tensor.detach()
    return cast("DTensor", tensor).full_tensor() if is_sharded(tensor) else tensor


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_sharded_model(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``: a ``fully_shard`` module or DTensor parameters."""
    return is_fsdp(model) or any(is_sharded(p) for p in model.parameters())


def run_on_main(model: nn.Module, write: Callable[[], None]) -> None:
    """Run ``write()`` once for the whole process group when ``model`` is sharded.

    On a sharded model (FSDP2) every process calls this, after gathering what ``write``
    needs with :func:`gather_full`: process 0 alone runs ``write``, and the others wait
    for it and raise if it failed, so no process returns before the files exist (or
    carries on after a failed save). On any other model ``write`` simply runs in the
    calling process (with DDP, call it on rank 0 only).

    Raises:
        AdapterFileError: on the other processes, when process 0 failed to write
            (process 0 raises its own error).
    """
    if not is_sharded_model(model):
        write()
        return
    failure: list[str | None] = [None]
    error: BaseException | None = None
    if _rank() == 0:
        try:
            write()
        except BaseException as exc:  # re-raised below, after the others are told
            error = exc
            failure[0] = f"{type(exc).__name__}: {exc}"
    torch.distributed.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise AdapterFileError(
            f"process 0 failed to write the adapter of this sharded model ({failure[0]}). "
            "Fix the cause shown there and save again."
        )


def refuse_sharded(layers: Iterable[tuple[str, nn.Module]], action: str) -> None:
    """Raise before ``action`` changes base weights that FSDP2 has split into shards.

    Raises:
        StateError: a LoRA layer's weight or adapters are DTensors.
    """
    sharded = [name for name, layer in layers
               if any(is_sharded(p) for p in layer.parameters(recurse=True))]
    if sharded:
        raise StateError(
            f"{action}: layers {sharded[:5]} hold parameters sharded by FSDP2 (DTensor), so "
            "each process has only a slice of W, A and B and a merge would need collectives "
            "per layer; nothing was changed. Merge on one process instead: "
            "loraplug.save_adapter(model, path) on every rank (rank 0 writes), then load it "
            "into an unsharded copy of the base model with loraplug.load_adapter and merge "
            "there."
        )
