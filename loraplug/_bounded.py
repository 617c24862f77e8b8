"""Limits on what files and arguments may hold: JSON depth, numbers, tensors, memory.

Adapter files come from anywhere, so every value read from one is checked against what
loraplug can compute with before it is used: JSON nested no deeper than
:data:`MAX_JSON_DEPTH` (Python's parser would raise ``RecursionError``), numbers that
are finite as floats (``10**400`` is a valid JSON integer), scalings that fit a float32
(the branch is computed in the weights' dtype), dense tensors with data, and adapters
that fit in the memory of the device they would be allocated on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._layer import LoRALayer

#: Deepest nesting of objects and arrays accepted in a config or metadata value.
MAX_JSON_DEPTH = 32
#: The largest rank accepted anywhere (tensor sizes are 64-bit; ranks past this would
#: need terabytes on any layer).
MAX_RANK = 2**31 - 1
#: alpha (and so the scaling alpha / r) must be a normal float32: a larger value makes the
#: scaled branch overflow in float32, a smaller one rounds the scaling to zero.
ALPHA_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


class JSONTooDeep(ValueError):
    """JSON text nested deeper than :data:`MAX_JSON_DEPTH`."""


def load_json(text: str | bytes) -> Any:
    """``json.loads(text)``, refusing nesting deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        JSONTooDeep: the text nests objects or arrays too deeply.
        ValueError: the text is not JSON.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONTooDeep(f"it nests objects or arrays deeper than {MAX_JSON_DEPTH} levels") \
            from None
    stack = [(value, 1)]
    while stack:  # iterative: a recursive walk would itself hit the recursion limit
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else ()
        if children and depth > MAX_JSON_DEPTH:
            raise JSONTooDeep(f"it nests objects or arrays deeper than {MAX_JSON_DEPTH} levels")
        stack += [(child, depth + 1) for child in children]
    return value


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` for messages, cut to ``limit`` characters; huge ints by their size
    (``repr(10**5000)`` itself raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an int or float (not a bool) that is a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):  # compared exactly: float(10**400) would raise
        return abs(value) <= sys.float_info.max
    return math.isfinite(value)


def alpha_ok(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a usable alpha: a number within :data:`ALPHA_RANGE`."""
    return finite_number(value) and ALPHA_RANGE[0] <= value <= ALPHA_RANGE[1]


def rank_ok(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an int (not a bool) in ``[1, MAX_RANK]``."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RANK


def tensor_problem(key: str, value: object) -> str | None:
    """Why ``value`` (stored under ``key``) cannot be an adapter tensor, or ``None``.

    An adapter tensor is a dense (strided) floating-point tensor with data: sparse,
    nested, quantized or meta tensors are refused, since copying them into a parameter
    fails or loses their meaning.
    """
    if not isinstance(value, Tensor):
        return f"{key!r} holds a {type(value).__name__}, not a tensor."
    if value.is_nested:
        return f"{key!r} is a nested tensor; expected a dense float tensor."
    if value.layout is not torch.strided:
        return (f"{key!r} is a sparse tensor (layout {value.layout}); expected a dense float "
                "tensor: convert it with .to_dense().")
    if value.is_meta:
        return (f"{key!r} is a tensor on the meta device (a shape without data); the file "
                "was saved from a model that was never materialised. Save it again from a "
                "trained model.")
    if not value.is_floating_point():
        return f"{key!r} has dtype {value.dtype}; expected a float tensor."
    return None


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes, where it can be known."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass  # a platform without sysconf, or a device that cannot be queried
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def memory_problem(probe: LoRALayer, rank: int) -> str | None:
    """Why an adapter of ``rank`` cannot be allocated on ``probe``'s layer, or ``None``.

    A new adapter is drawn in float32 on the weight's device; when A and B together
    would need more than the device's whole memory, the allocation cannot succeed (and
    might first push the machine into swap or the out-of-memory killer).
    """
    shape_a, shape_b = probe.adapter_shapes(rank)
    needed = 4 * (math.prod(shape_a) + math.prod(shape_b))
    device = probe.weight.device
    total = _device_memory(device)
    if total is None or needed <= total:
        return None
    return (f"rank {rank} needs {_gib(needed)} for A {tuple(shape_a)} and B {tuple(shape_b)}, "
            f"more than the {_gib(total)} of the {device.type} device. Use a smaller rank; a "
            f"rank above {probe.max_rank()} adds nothing on this layer.")
