"""Preparing a model with quantized (k-bit) base layers for memory-saving LoRA training."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._adapters import lora_layers
from ._errors import ConfigError


def require_grad_hook(module: nn.Module, inputs: object, output: object) -> None:
    """Forward hook: the output requires grad (a frozen embedding's output does not)."""
    if isinstance(output, Tensor) and output.is_floating_point() and torch.is_grad_enabled() \
            and not output.requires_grad:
        output.requires_grad_(True)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter: Any = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except NotImplementedError:
            found = None
        if isinstance(found, nn.Module):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    enable: Any = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        getattr(model, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs=kwargs)  # noqa: B009


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = True, use_reentrant: bool = False
) -> nn.Module:
    """Prepare a model with quantized base layers for LoRA training (QLoRA), in place.

    The memory-saving preparation PEFT users know as ``prepare_model_for_kbit_training``,
    as one call, before or after :func:`inject_lora`:

    1. Frozen base: every parameter that is not a LoRA parameter gets
       ``requires_grad=False`` (the quantized weights never have gradients).
    2. Norms in float32: every float16/bfloat16 parameter that is not stored quantized
       (norms, embeddings, the output head) becomes float32, as PEFT does. The norms'
       statistics are what loses most in half precision, and the layers after a float32
       norm receive float32 inputs, which a half-precision ``nn.Linear`` would refuse.
    3. Input gradients, with ``use_reentrant=True``: the output of the input embeddings
       (``model.get_input_embeddings()``, else the first ``nn.Embedding``) requires grad.
       Reentrant checkpointing differentiates a block only if its input requires grad,
       which a frozen embedding's output does not, so the adapters inside would get no
       gradient. Non-reentrant checkpointing (the default) needs nothing.
    4. With ``gradient_checkpointing``, transformers' activation checkpointing is switched
       on: each decoder block drops its activations in forward and recomputes them in
       backward.

    Args:
        model: the model; changed in place.
        gradient_checkpointing: enable checkpointing through the model's
            ``activation_checkpointing_enable`` (or ``gradient_checkpointing_enable``), as
            transformers models have. Other models checkpoint their own blocks with
            ``torch.utils.checkpoint.checkpoint`` and pass False.
        use_reentrant: passed to ``torch.utils.checkpoint.checkpoint``; also set it when
            the model checkpoints its own blocks reentrantly (with
            ``gradient_checkpointing=False``) to get the input gradients of step 3.

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: a flag is not a bool, or ``gradient_checkpointing`` is set on a model
            that has no checkpointing switch (nothing is changed then).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8))
        >>> model = model.to(torch.bfloat16)
        >>> _ = lp.inject_lora(model, target="2", rank=2)
        >>> _ = lp.prepare_for_kbit_training(model, gradient_checkpointing=False,
        ...                                  use_reentrant=True)
        >>> model[1].weight.dtype, model[2].lora_A["default"].requires_grad
        (torch.float32, True)
        >>> model(torch.tensor([[1, 2]]))[0].requires_grad
        True
    """
    for flag, value in (("gradient_checkpointing", gradient_checkpointing),
                        ("use_reentrant", use_reentrant)):
        if not isinstance(value, bool):
            raise ConfigError(f"prepare_for_kbit_training: {flag} must be True or False; "
                              f"received {value!r}.")
    switch = ("activation_checkpointing_enable", "gradient_checkpointing_enable")
    if gradient_checkpointing and not any(callable(getattr(model, s, None)) for s in switch):
        raise ConfigError(
            f"prepare_for_kbit_training: {type(model).__name__} has no "
            "activation_checkpointing_enable or gradient_checkpointing_enable (transformers "
            "models have them); nothing was changed. Checkpoint its blocks with "
            "torch.utils.checkpoint.checkpoint in its forward and pass "
            "gradient_checkpointing=False."
        )
    lora = {id(p) for _, layer in lora_layers(model)
            for store in (layer.lora_A, layer.lora_B) for p in store.values()}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            # Quantized weights are parameter subclasses (Params4bit, torchao's tensors).
            if type(p) is nn.Parameter and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    embeddings = _input_embeddings(model) if use_reentrant else None
    if embeddings is not None and require_grad_hook not in embeddings._forward_hooks.values():
        embeddings.register_forward_hook(require_grad_hook)
    if gradient_checkpointing:
        _enable_checkpointing(model, use_reentrant)
    return model
