"""Where a LoRA layer's weight lives, writing merged weights there, and an honest merged flag.

A layer's ``weight`` is usually a tensor it stores (a parameter or a buffer), and a
merge adds ΔW to it in place. Two other homes are handled at the edges of merging:

- **parametrized** (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``,
  ``orthogonal``, ``spectral_norm``, your own): ``weight`` is computed from
  ``parametrizations.weight.original`` on every access. A merged weight is assigned
  through the parametrization's ``right_inverse`` (as ``module.weight = W`` would) on a
  copy, read back, and written only if the parametrization gives ``W + ΔW`` back:
  ``weight_norm`` does; an orthogonal or spectral-normalised weight plus ΔW is in
  general neither, so merging is refused with the reason, before anything changes.
- **computed by a forward pre-hook** (the older ``torch.nn.utils.spectral_norm`` and
  ``weight_norm``, ``torch.nn.utils.prune``): ``weight`` is a plain attribute the hook
  overwrites on every forward (the hooks run on the LoRA layer: ``_hooks.py``), so a
  merged ΔW would vanish; merging is refused.

Merging is refused too where the tensors a merge writes share memory with another
module's (tied weights, or ``b.weight.data = a.weight.data``): storages are compared.
``load_state_dict`` into a merged layer keeps the merged flag true (see
:func:`before_loading`), and a merged layer that runs a training forward warns once.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._errors import LoRAWarning, StateError
from ._products import compute_dtype

if TYPE_CHECKING:
    from ._layer import LoRALayer

Home = Literal["stored", "parametrized", "computed"]


def weight_home(layer: LoRALayer) -> Home:
    """Where ``layer.weight`` comes from: a stored tensor, a parametrization, or neither."""
    owner, key = layer.weight_key()  # a bare parameter's layer: its host holds it
    if key in owner._parameters or key in owner._buffers:
        return "stored"
    if parametrize.is_parametrized(layer.base_layer, "weight"):
        return "parametrized"
    if not layer._forward_pre_hooks and any(
            isinstance(getattr(type(m), "weight", None), property)
            for m in (layer, layer.base_layer)):
        return "stored"  # a type's own view of tensors it holds (attention and its parts)
    return "computed"


def merge_problem(layer: LoRALayer) -> str | None:
    """Why ``layer`` cannot fold adapters into its weight at all, or ``None``.

    The layer type's ``merge_refusal``, or a weight that no tensor holds (computed by a
    hook on every forward). Whether a parametrization can hold a given merged weight is
    known only once it is computed: see :func:`staging_problem`.
    """
    if layer.merge_refusal is not None:
        return layer.merge_refusal
    if weight_home(layer) != "computed":
        return None
    hooks = sorted({type(h).__name__ for h in layer._forward_pre_hooks.values()})
    return (
        f"its weight is not a stored tensor but computed on every forward (forward pre-hooks: "
        f"{hooks}; torch.nn.utils.prune, spectral_norm and weight_norm work so), which would "
        "overwrite a merged ΔW. Keep the adapters unmerged, or make the weight a plain tensor "
        "before injecting (torch.nn.utils.prune.remove, remove_weight_norm, "
        "remove_spectral_norm), or use torch.nn.utils.parametrizations.weight_norm, which "
        "merges."
    )


# ----------------------------------------------------------------- parametrized weights
def _parametrization(layer: LoRALayer) -> parametrize.ParametrizationList:
    return cast(parametrize.ParametrizationList, layer.base_layer.parametrizations["weight"])


def _assign(plist: parametrize.ParametrizationList, weight: Tensor
            ) -> parametrize.ParametrizationList:
    # A copy of ``plist`` in weight's dtype, assigned ``weight`` through right_inverse (as
    # ``module.weight = weight`` would) and in evaluation mode: spectral_norm then runs
    # no power iteration, so reading it back updates no buffer.
    staged = copy.deepcopy(plist).to(weight.dtype)
    staged.right_inverse(weight)
    return staged.train(False)


def _assigned(layer: LoRALayer,
              weight: Tensor) -> tuple[parametrize.ParametrizationList | None, str]:
    # The parametrization's copy that holds ``weight``, if it reads back as ``weight`` (in
    # float32 at least, to 16 ulps of its largest element); else None and why. Copies take
    # the side effects: buffers right_inverse sets, random draws (on a forked generator).
    plist = _parametrization(layer)
    names = [type(p).__name__ for p in plist]
    exact = compute_dtype(weight.dtype)
    devices = [weight.device.index or 0] if weight.device.type != "cpu" else []
    kind = weight.device.type if devices else "cuda"
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=kind):
            staged = _assign(plist, weight)
            wanted = weight.to(exact)
            back = (staged if exact == weight.dtype else _assign(plist, wanted))()
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as err:
        return None, f"its parametrization {names} cannot be assigned a weight ({err})"
    scale = float(wanted.abs().max()) if wanted.numel() else 0.0
    off = float((back - wanted).abs().max()) if wanted.numel() else 0.0
    if not off <= 16 * torch.finfo(exact).eps * scale:
        return None, (
            f"its parametrization {names} cannot hold W + ΔW: assigned through right_inverse "
            f"and read back, the weight is off by up to {off:.3g} (largest |W + ΔW|: "
            f"{scale:.3g}); such a parametrization restricts the weights it can produce. Keep "
            "the adapters unmerged, or remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations)."
        )
    return staged, ""


def staging_problem(layer: LoRALayer, weight: Tensor) -> str | None:
    """Why writing ``weight`` into ``layer`` would not give ``weight`` back, or ``None``."""
    if weight_home(layer) != "parametrized":
        return merge_problem(layer)
    return _assigned(layer, weight)[1] or None


def write_weight(layer: LoRALayer, weight: Tensor) -> None:
    """Write ``weight`` (merged or unmerged) into where ``layer``'s weight lives.

    Raises:
        StateError: the weight is computed by a hook, or its parametrization cannot hold
            ``weight``; nothing is written then.
    """
    home = weight_home(layer)
    if home == "stored":
        layer._tensor("weight").copy_(weight)
        return
    staged, why = _assigned(layer, weight) if home == "parametrized" else (None, "")
    if staged is None:
        raise StateError(f"a {type(layer).__name__} cannot be merged: "
                         f"{why or merge_problem(layer)}")
    plist = _parametrization(layer)
    with torch.no_grad():
        for ours, theirs in ((plist.named_parameters(), staged.named_parameters()),
                             (plist.named_buffers(), staged.named_buffers())):
            new = dict(theirs)
            for key, tensor in ours:
                tensor.copy_(new[key])


def written_tensors(layer: LoRALayer) -> list[Tensor]:
    """The tensors a merge writes: the weight, or its parametrization's tensors."""
    home = weight_home(layer)
    if home == "stored":
        return [layer._tensor("weight")]
    if home == "parametrized":
        plist = _parametrization(layer)
        return [*plist.parameters(), *plist.buffers()]
    return []


# ----------------------------------------------------------------- shared memory
def _extent(tensor: Tensor) -> tuple[Any, int, int] | None:
    # (storage, first byte, byte past the last) that ``tensor`` can reach; tensor
    # subclasses without a storage are known by identity. None for meta and empty.
    try:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()  # a wrapper subclass (torchao) has a storage without data
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(tensor)), 0, 1
    if tensor.is_meta or pointer == 0 or tensor.numel() == 0:
        return None
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    span = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride())) + 1
    return (tensor.device, pointer), int(start), int(start + span * size)


def shared_memory(model: nn.Module, layers: list[tuple[str, LoRALayer]],
                  name_of: Callable[[str], str]) -> dict[str, list[str]]:
    """LoRA layer name -> other modules holding tensors that overlap what its merge writes.

    Tied Parameters (one object in two modules) and tensors made to share memory
    (``b.weight.data = a.weight.data``) alike; ``name_of`` cleans module paths.
    """
    index: dict[Any, list[tuple[int, int, str, int]]] = {}
    for path, module in model.named_modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            where = None if tensor is None else _extent(tensor)
            if where is not None:
                index.setdefault(where[0], []).append((where[1], where[2], name_of(path),
                                                       id(module)))
    found: dict[str, list[str]] = {}
    for name, layer in layers:
        own = {id(m) for m in layer.modules()} | {id(layer.weight_key()[0])}
        others = {path for tensor in written_tensors(layer) if (w := _extent(tensor))
                  for start, end, path, owner in index.get(w[0], ())
                  if owner not in own and start < w[2] and w[1] < end
                  and not _nested(name, path)}
        if others:
            found[name] = sorted(others)
    return found


def _nested(a: str, b: str) -> bool:
    # A layer type's parts hold views of their owner's tensors (attention's q, k, v):
    # an owner and the parts inside it share memory by design, not by tying.
    return bool(a and b) and (a.startswith(b + ".") or b.startswith(a + "."))


# ----------------------------------------------------------------- the merged flag
def _differs(state: Mapping[str, Any], key: str, tensor: Tensor) -> bool:
    value = state.get(key)
    if not isinstance(value, Tensor):
        return False
    if tuple(value.shape) != tuple(tensor.shape):
        return True  # load_state_dict reports the mismatch; the flag must not outlive it
    return not torch.equal(value.detach().to(tensor.device, tensor.dtype), tensor.detach())


def before_loading(layer: LoRALayer, state: Mapping[str, Any], prefix: str) -> None:
    """Keep a merged layer's flag true when ``load_state_dict`` is about to load into it.

    A loaded weight that differs from the merged one is taken for a base weight: the
    layer is marked unmerged (its adapters are computed beside the weight again), with
    a warning. Loaded values for a merged adapter's A or B would leave the merged weight
    stale: the old ΔW is taken out first. Loading the weights the layer holds changes
    nothing.
    """
    if not layer.merged_adapters:
        return
    merged = list(layer.merged_adapters)
    keys = ({prefix + "weight": layer._tensor("weight")} if weight_home(layer) != "parametrized"
            else {f"{prefix}parametrizations.weight.{k}": t for k, t in
                  (*_parametrization(layer).named_parameters(),
                   *_parametrization(layer).named_buffers())})
    if any(_differs(state, key, tensor) for key, tensor in keys.items()):
        layer._folds.clear()  # what they kept to unmerge exactly belongs to the old weight
        layer.merged_adapters = ()
        layer._refresh()
        what = (f"replaced the weight of a LoRA layer that had {merged} merged; the loaded "
                "weight is taken as the base weight, so the layer is unmerged now and computes "
                "those adapters beside it. Call loraplug.merge(model) to fold them in again. "
                "(A state dict saved while merged holds W + ΔW: save state dicts unmerged, or "
                "a plain model with loraplug.save_merged.)")
    elif any(_differs(state, f"{prefix}{store}.{n}", tensor) for n in merged
             for store, tensor in zip(("lora_A", "lora_B"), layer._adapter(n))):
        layer.unmerge()
        what = (f"loads new values into adapters {merged}, which were merged into the weight; "
                "they were unmerged first, so that the weight holds no stale ΔW. Call "
                "loraplug.merge(model) to fold the new values in.")
    else:
        return
    warnings.warn(f"load_state_dict {what}", LoRAWarning, stacklevel=4)


def warn_training_merged(layer: LoRALayer) -> None:
    """Warn once per layer that a merged layer runs a training forward for its adapters.

    Not under ``torch.compile`` (a warning would break the graph).
    """
    if torch.compiler.is_compiling() or layer.__dict__.get("_warned_merged_training") \
            or not torch.is_grad_enabled():
        return
    if not any(t.requires_grad for n in layer.merged_adapters for t in layer._adapter(n)):
        return
    layer.__dict__["_warned_merged_training"] = True
    warnings.warn(
        f"a {type(layer).__name__} with {list(layer.merged_adapters)} merged runs forward in "
        "training mode: merged adapters are folded into the weight and get no gradient, so "
        "they do not train (backward then fails with 'element 0 of tensors does not require "
        "grad', or trains only the other parameters). Call loraplug.unmerge(model) before "
        "training, and merge again after it; for inference, call model.eval() or run under "
        "torch.no_grad().",
        LoRAWarning, stacklevel=3,
    )


@contextlib.contextmanager
def reading_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Parametrizations of ``modules`` in evaluation mode inside the block.

    Reading a weight must not change the model: in training mode ``spectral_norm``'s
    parametrization runs a power iteration, updating its buffers, at every read.
    """
    inner = [m for module in modules if parametrize.is_parametrized(module)
             for m in cast(nn.Module, module.parametrizations).modules()]
    modes = [m.training for m in inner]
    for m in inner:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(inner, modes):
            m.training = mode
