"""``loraplug merge``: merged weights the original architecture loads."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TypeGuard

from torch import Tensor

from .._format import UnreadableWeights, read_weights
from ._common import CLIError, build_model, byte_size, count_of

_NOT_A_STATE_DICT = "--weights {path} holds a {held}, not a state dict (key -> tensor)"


def _load_checkpoint(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise CLIError(f"--weights {path}: no such file")
    try:
        state, _ = read_weights(path)
    except UnreadableWeights as err:
        raise CLIError(_unreadable(err)) from err.__cause__
    if _is_state_dict(state):
        return state
    # Training checkpoints often nest the weights: {"state_dict": {...}, "epoch": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        inner = state.get(key)
        if _is_state_dict(inner):
            return inner
    raise CLIError(_NOT_A_STATE_DICT.format(path=path, held=type(state).__name__))


def _unreadable(err: UnreadableWeights) -> str:
    if err.reason == "mapping":
        return _NOT_A_STATE_DICT.format(path=err.path, held=err.detail)
    if err.reason == "refused" and err.detail:
        return (f"refused to load {err.path}: it holds objects other than tensors "
                f"({err.detail}), and unpickling those can run arbitrary code. Save the "
                "model's state_dict() alone, or as safetensors")
    kind = "safetensors" if err.reason == "safetensors" else "torch"
    detail = f" ({err.detail})" if err.detail else ""
    return f"--weights {err.path} is not a readable {kind} file{detail}"


def _is_state_dict(value: object) -> TypeGuard[Mapping[str, Tensor]]:
    return isinstance(value, Mapping) and all(isinstance(v, Tensor) for v in value.values())


def cmd_merge(args: argparse.Namespace) -> int:
    from .._load import load_adapter
    from .._save import save_merged

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CLIError(f"--out {out}: the merged weights are written as safetensors; name the "
                       "file *.safetensors", code=2)
    if not out.parent.is_dir():
        raise CLIError(f"--out {out}: directory {out.parent} does not exist")
    model = build_model(args.model)
    state = _load_checkpoint(Path(args.weights))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise CLIError(
            f"--weights {args.weights} does not fit {args.model}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(reshaped)} of another shape {reshaped[:3]}")
    model.load_state_dict(state)
    layers = load_adapter(model, args.adapter, name=args.name)
    save_merged(model, out)
    print(f"merged the adapter in {args.adapter} into {count_of(len(layers), 'layer')} of "
          f"{args.model}; wrote {out} ({byte_size(out.stat().st_size)}).")
    print("Load it without loraplug: model.load_state_dict(safetensors.torch.load_file("
          f"{str(out)!r}))")
    return 0
