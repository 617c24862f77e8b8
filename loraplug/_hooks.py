"""Hooks registered on a wrapped module keep running on the LoRA layer that replaces it.

Once injected, the model calls the LoRA layer, never the module it wraps, so hooks
registered on that module (``register_forward_pre_hook``, ``register_forward_hook``,
full backward hooks, state-dict hooks, and the forward pre-hooks through which
``torch.nn.utils.prune``, ``spectral_norm`` and ``weight_norm`` recompute the weight)
would never run. Injection therefore hands the module's hook registries to the layer
and ``unload`` hands them back. The registries move as objects, so the handles that
``register_*_hook`` returned keep working, and hooks registered on the layer while it
is in the model stay with the module after ``unload``. A hook receives the LoRA layer as
its module: the same parameters and buffers, under the same names.
"""

from __future__ import annotations

from torch import nn

#: Every per-module hook registry of nn.Module, with the flag that says whether its
#: backward hooks are full ones.
_REGISTRIES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_is_full_backward_hook", "_state_dict_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def swap_hooks(module: nn.Module, layer: nn.Module) -> None:
    """Exchange the hook registries of ``module`` and ``layer``; its own inverse.

    At injection the wrapped module's hooks go to its LoRA layer (whose registries are
    empty), and at ``unload`` they come back, with any registered on the layer since.
    """
    for key in _REGISTRIES:
        if key in module.__dict__ and key in layer.__dict__:
            module.__dict__[key], layer.__dict__[key] = layer.__dict__[key], module.__dict__[key]
