"""The ``loraplug`` command line: ``targets``, ``inspect`` and ``merge``.

- ``loraplug targets MODEL [--target PATTERN ...] [--rank R]``: every layer of a model
  with its type and weight shape, which ones a target would wrap and the parameters
  the adapter would add there. A dry run: nothing is built but the model's shapes.
- ``loraplug inspect ADAPTER_DIR``: an adapter directory's config, layers, ranks,
  alphas, dtypes and sizes, and whether every tensor is finite.
- ``loraplug merge --model MODEL --weights CKPT --adapter DIR --out FILE``: the model's
  weights with the adapter folded in, as a safetensors file the original architecture
  loads with ``load_state_dict``.

MODEL is ``torchvision:NAME`` (built without pretrained weights) or
``package.module:callable`` (called without arguments; a module instance works too).
Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is
unpickled. Errors print one line and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._errors import LoRAError
from ._registry import lookup, supported_types, type_name


class CLIError(Exception):
    """A failure to report in one line, with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _one_line(message: str) -> str:
    parts = [line.strip().removeprefix("- ").strip() for line in str(message).splitlines()]
    return "; ".join(p for p in parts if p).replace(":;", ":")


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block before its error; one line is easier to read.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)", code=2)


# --------------------------------------------------------------------------- models
def build_model(spec: str, *, meta: bool = False) -> nn.Module:
    """Build the model ``spec`` names: ``torchvision:NAME`` or ``package.module:callable``.

    With ``meta``, the model is first built on the meta device (shapes only: fast, no
    memory); a builder that cannot run there is built on the CPU instead.
    """
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise CLIError(
            f"MODEL {spec!r} is not torchvision:NAME or package.module:callable, e.g. "
            "torchvision:resnet18 or mypackage.models:build_model", code=2)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError as err:
            raise CLIError("torchvision:NAME needs torchvision: pip install torchvision") from err
        available = torchvision.models.list_models()
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, available, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                "; torchvision.models.list_models() lists them"
            raise CLIError(f"torchvision has no model {name!r}{hint}", code=2)

        def builder() -> object:
            return torchvision.models.get_model(name, weights=None)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise CLIError(f"cannot import {source!r} for MODEL {spec!r}: {err}") from err
        obj: object = module
        for part in name.split("."):
            if not hasattr(obj, part):
                raise CLIError(f"{source} has no attribute {name!r} (MODEL {spec!r})")
            obj = getattr(obj, part)
        if isinstance(obj, nn.Module):
            return obj
        if not callable(obj):
            raise CLIError(f"{spec} is a {type(obj).__name__}; expected a callable that "
                           "returns an nn.Module, or an nn.Module")
        builder = obj  # type: ignore[assignment]
    model = None
    if meta:
        try:
            with torch.device("meta"):
                model = builder()
        except Exception:  # a builder that loads or computes data: build it for real
            model = None
    if model is None:
        try:
            model = builder()
        except Exception as err:
            raise CLIError(f"building {spec} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec} returned a {type(model).__name__}; expected an nn.Module")
    return model


def _pattern(text: str) -> object:
    """A command-line target: a glob, ``re:REGEX`` or ``type:CLASS``."""
    if text.startswith("re:"):
        try:
            return re.compile(text[3:])
        except re.error as err:
            raise CLIError(f"--target {text!r}: not a regular expression ({err})", code=2) from err
    if text.startswith("type:"):
        name = text[5:]
        dotted = name.removeprefix("torch.").removeprefix("nn.")
        if hasattr(nn, dotted) and isinstance(getattr(nn, dotted), type):
            return getattr(nn, dotted)
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name) if module_name else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise CLIError(f"--target {text!r}: {name!r} is not a module class; use e.g. "
                           "type:Linear, type:nn.Conv2d or type:package.module.Class", code=2)
        return cls
    return text


# --------------------------------------------------------------------------- targets
def _shape(module: nn.Module) -> str:
    weight = module._parameters.get("weight")
    tensors = [weight] if weight is not None else list(module.parameters(recurse=False))
    return "×".join(map(str, tensors[0].shape)) if tensors else ""


def _table(header: Sequence[str], rows: list[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def cmd_targets(args: argparse.Namespace) -> int:
    from ._targeting import candidates, select

    if args.rank < 1:
        raise CLIError(f"--rank must be a positive integer; received {args.rank}", code=2)
    model = build_model(args.model, meta=True)
    chosen: dict[str, nn.Module] = {}
    if args.target:
        selection = select(model, [_pattern(t) for t in args.target],
                           [_pattern(t) for t in args.exclude] or None)
        chosen = selection.modules
    total = sum(p.numel() for p in model.parameters())
    rows, added, notes = [], 0, []
    for name, _, module in candidates(model):
        found = lookup(type(module))
        if not name or (found is None and next(module.parameters(recurse=False), None) is None):
            continue
        mark, params = "", ""
        if name in chosen:
            layer_cls, registered = found  # type: ignore[misc]
            probe = layer_cls(module, registered)
            why = probe.check_rank(args.rank)
            shape_a, shape_b = probe.adapter_shapes(args.rank)
            count = math.prod(shape_a) + math.prod(shape_b)
            added += count
            mark, params = "*", f"{count:,}"
            if why:
                notes.append(f"{name}: {why}")
                mark = "!"
            elif args.rank > probe.max_rank():
                notes.append(f"{name}: rank {args.rank} exceeds the rank ΔW can have there "
                             f"({probe.max_rank()}); the extra parameters add nothing")
        supported = "" if found is None else "yes"
        rows.append((mark, name, type_name(type(module)), _shape(module), supported, params))
    header = ("", "layer", "type", "weight", "LoRA", f"+params (r={args.rank})" if chosen else "")
    print(_table(header, rows, right=(5,)))
    if chosen:
        print(f"\n{len(chosen)} layers selected (*); rank {args.rank} adds {added:,} parameters "
              f"to the model's {total:,} ({100 * added / total if total else 0:.3f}%).")
        refused = sum(1 for row in rows if row[0] == "!")
        if refused:
            print(f"inject_lora would raise ConfigError for the {refused} layer(s) marked !:")
        for note in notes:
            print(f"! {note}")
    else:
        able = sum(1 for row in rows if row[4])
        print(f"\n{able} layers can take LoRA ({', '.join(supported_types())}); pass --target "
              "PATTERN to see what a pattern selects.")
    return 1 if any(row[0] == "!" for row in rows) else 0


# --------------------------------------------------------------------------- inspect
def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def _dims(t: Tensor) -> str:
    return "×".join(map(str, t.shape))


def cmd_inspect(args: argparse.Namespace) -> int:
    # The readers load_adapter uses, so that inspect sees a file exactly as loading does.
    from ._adapter_state import CONFIG_NAME, index_keys
    from ._load import _locate, _read_config, _read_metadata, _read_weights
    from ._peft_config import parse_config

    directory, weights_file = _locate(Path(args.adapter_dir))
    raw = _read_config(directory / CONFIG_NAME)
    state, metadata = _read_weights(weights_file)
    config, problems, unknown = parse_config(raw)
    extras, found = _read_metadata(metadata)
    problems += found
    entries, others, found = index_keys(state, set())
    problems += found

    print(f"adapter   {directory}")
    print(f"weights   {weights_file.name} ({_size(weights_file.stat().st_size)})")
    if "loraplug" in extras:
        print(f"written   by loraplug {metadata.get('loraplug.version', '?')} (file format "
              f"{metadata.get('loraplug.format')}); adapter name {extras.get('adapter', '?')!r}")
    else:
        print("written   by PEFT or another tool (no loraplug metadata)")
    if isinstance(raw, dict):
        # The fields that shape the adapter, in PEFT's names; empty ones are left out.
        fields = ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "bias",
                  "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                  "base_model_name_or_path", "task_type")
        shown = [f"{k}={json.dumps(raw[k])}" for k in fields
                 if raw.get(k) not in (None, [], {}, "")]
        print("config    " + "  ".join(shown))
    if unknown:
        print(f"config    fields loraplug ignores: {unknown}")

    rows, params, nbytes, bad = [], 0, 0, []
    for path, slots in sorted(entries.items()):
        a = slots.get("A", (None, None, None))[1]
        b = slots.get("B", (None, None, None))[1]
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            problems.append(f"{path}: needs both lora_A and lora_B tensors")
            continue
        rank = a.shape[0]  # A is (r, in…) for every layer type, (r, V) for embeddings
        alpha_text = scaling_text = "?"
        if config is not None:
            want, alpha, source = config.spec(path)
            if want != rank:
                problems.append(f"{path}: tensors have rank {rank} but {source} says {want}")
            scale = alpha / (math.sqrt(rank) if config.use_rslora else rank)
            alpha_text, scaling_text = f"{alpha:g}", f"{scale:.4g}"
        finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) \
            if a.is_floating_point() and b.is_floating_point() else False
        if not finite:
            bad.append(path)
        dtype = str(a.dtype).removeprefix("torch.")
        if b.dtype != a.dtype:
            dtype += "/" + str(b.dtype).removeprefix("torch.")
        size = a.numel() * a.element_size() + b.numel() * b.element_size()
        params += a.numel() + b.numel()
        nbytes += size
        rows.append((path, str(rank), alpha_text, scaling_text, _dims(a), _dims(b), dtype,
                     _size(size), "yes" if finite else "NO"))
    print()
    if rows:
        print(_table(("layer", "rank", "alpha", "scaling", "A", "B", "dtype", "size", "finite"),
                     rows, right=(1, 2, 3, 7)))
    layers = f"{len(rows)} layer{'s' if len(rows) != 1 else ''}"
    print(f"\n{layers}, {params:,} parameters, {_size(nbytes)} of tensors; "
          + ("all finite." if not bad else f"NaN or inf in {bad}."))
    if others:
        problems.append(f"{len(others)} tensors are not LoRA tensors: {sorted(others)[:5]}")
    for problem in problems:
        print(f"problem: {_one_line(problem)}")
    return 1 if problems or bad else 0


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
    from ._files import load_adapter, save_merged

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
    print(f"merged the adapter in {args.adapter} into {len(layers)} layers of {args.model}; "
          f"wrote {out} ({_size(out.stat().st_size)}).")
    print("Load it without loraplug: model.load_state_dict(safetensors.torch.load_file("
          f"{str(out)!r}))")
    return 0


# --------------------------------------------------------------------------- entry point
def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``loraplug`` command."""
    from . import __version__

    model_help = ("torchvision:NAME (built without weights) or package.module:callable "
                  "(returns an nn.Module)")
    parser = _Parser(prog="loraplug", description="LoRA adapters for any PyTorch model: see "
                     "what a target wraps, inspect adapter files, merge adapters into weights.")
    parser.add_argument("--version", action="version", version=f"loraplug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("targets", help="list a model's layers and what a target would wrap",
                       description="List every layer of MODEL with its type and weight shape; "
                       "with --target, mark the layers inject_lora would wrap and the parameters "
                       "a rank-R adapter adds. Builds only the model's shapes (meta device).")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--target", "-t", action="append", default=[], metavar="PATTERN",
                   help="glob over module names ('classifier.*'), re:REGEX, or type:CLASS "
                   "(type:Linear); repeat for several")
    p.add_argument("--exclude", "-x", action="append", default=[], metavar="PATTERN",
                   help="pattern to leave out, as for --target")
    p.add_argument("--rank", "-r", type=int, default=8, help="adapter rank (default: 8)")
    p.set_defaults(run=cmd_targets)

    p = sub.add_parser("inspect", help="describe an adapter directory",
                       description="Show an adapter directory's config, its layers with rank, "
                       "alpha, scaling, shapes, dtypes and sizes, and whether every tensor is "
                       "finite. Exits 1 if a problem is found.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                   help="directory with adapter_config.json and adapter_model.safetensors")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("merge", help="write a model's weights with an adapter merged in",
                       description="Load MODEL's weights from CKPT, load the adapter, and write "
                       "the merged weights to FILE (safetensors) under the original keys, so "
                       "the plain architecture loads them.")
    p.add_argument("--model", required=True, metavar="MODEL", help=model_help)
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="the base weights: .safetensors, or a torch state dict (.pt/.pth/.bin, "
                   "read with weights_only=True)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter directory")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    p.add_argument("--name", default=None,
                   help="adapter name to load it under (default: the saved one)")
    p.set_defaults(run=cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loraplug`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on failure, 2 for bad arguments.
    """
    parser = make_parser()
    command = "loraplug"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        command = f"loraplug {args.command}"
        return int(args.run(args))
    except CLIError as err:
        print(f"{command}: error: {_one_line(str(err))}", file=sys.stderr)
        return err.code
    except (LoRAError, OSError) as err:
        print(f"{command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
