"""The ``loraplug`` command line: ``targets``, ``inspect`` and ``merge``.

- ``loraplug targets MODEL [--target PATTERN ...] [--target-parameter PATTERN ...]
  [--rank R]``: every layer of a model with its type and weight shape, which ones a
  target would wrap, the parameters the adapter would add there and the path it takes
  (a branch, or through the weight). A dry run: nothing is built but the model's shapes.
- ``loraplug inspect ADAPTER_DIR``: an adapter directory's config, layers, ranks,
  alphas, dtypes and sizes, and whether every tensor is finite.
- ``loraplug merge --model MODEL --weights CKPT --adapter DIR --out FILE``: the model's
  weights with the adapter folded in, as a safetensors file the original architecture
  loads with ``load_state_dict``.

MODEL is ``torchvision:NAME`` (built without pretrained weights) or
``package.module:callable`` (called without arguments; a module instance works too),
imported from the current directory first, then from the installed packages.
Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is
unpickled. Errors print one line and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._errors import LoRAError
from ._common import CLIError, Parser, one_line
from ._inspect import cmd_inspect
from ._merge import cmd_merge
from ._targets import cmd_targets


# --------------------------------------------------------------------------- entry point
def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``loraplug`` command."""
    from .._version import VERSION

    model_help = ("torchvision:NAME (built without weights) or package.module:callable "
                  "(returns an nn.Module)")
    parser = Parser(prog="loraplug", description="LoRA adapters for PyTorch models: see what "
                     "a target wraps, inspect adapter files, merge adapters into weights.")
    parser.add_argument("--version", action="version", version=f"loraplug {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

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
    p.add_argument("--target-parameter", "-p", action="append", default=[], metavar="PATTERN",
                   help="a bare parameter to adapt through the weight, by full name "
                        "(repeatable), as inject_lora's target_parameters")
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
        print(f"{command}: error: {one_line(str(err))}", file=sys.stderr)
        return err.code
    except (LoRAError, OSError) as err:
        print(f"{command}: error: {one_line(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
