"""``loraplug merge``: merged weights the original architecture loads."""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ._common import CLIError, _count, _size, build_model


# --------------------------------------------------------------------------- merge
def _load_checkpoint(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise CLIError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CLIError(f"--weights {path} is not a readable safetensors file ({err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The tensor-only unpickler names the class it refused ("GLOBAL posix.system");
        # other failures mean the bytes are not a torch file at all.
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        if not detail:
            raise CLIError(f"--weights {path} is not a readable torch file") from err
        raise CLIError(
            f"refused to load {path}: it holds objects other than tensors ({detail}), and "
            "unpickling those can run arbitrary code. Save the model's state_dict() alone, or "
            "as safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CLIError(f"--weights {path} is not a readable torch file ({err})") from err
    # Training checkpoints often nest the weights: {"state_dict": {...}, "epoch": ...}.
    if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, Tensor) for v in inner.values()):
                return inner
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CLIError(f"--weights {path} holds a {type(state).__name__}, not a state dict "
                       "(key -> tensor)")
    return state


def cmd_merge(args: argparse.Namespace) -> int:
    from .._files import load_adapter, save_merged

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
    print(f"merged the adapter in {args.adapter} into {_count(len(layers), 'layer')} of "
          f"{args.model}; wrote {out} ({_size(out.stat().st_size)}).")
    print("Load it without loraplug: model.load_state_dict(safetensors.torch.load_file("
          f"{str(out)!r}))")
    return 0
