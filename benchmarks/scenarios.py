"""The scenarios, and what is measured on each for loraplug and PEFT side by side."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import loraplug as lp

from . import attention
from .models import GPT, linear_names, vgg19
from .timing import calibrate, flops, interleaved, peak_memory, seconds
from .twins import (
    loraplug_twin,
    lp_layers,
    max_difference,
    peft_available,
    peft_config,
    peft_merge,
    peft_twin,
    peft_unmerge,
)


@dataclass
class Scenario:
    """A base model, its input, where the adapters go, and how long to measure."""

    name: str
    about: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Tensor]
    targets: Callable[[nn.Module], list[str]]
    rank: int
    alpha: float
    rounds: int = 7
    train_rounds: int = 5
    admin_rounds: int = 3
    #: Seconds per timing sample; small calls are repeated to fill it.
    sample_s: float = 0.0
    #: The module that is called: the whole model, or one layer for the per-call case.
    entry: Callable[[nn.Module], nn.Module] = field(default=lambda m: m)
    #: PEFT's side when it cannot hold the same targets: (base, rank, alpha) -> (targets,
    #: rank, alpha, copy), ``copy(loraplug_model, peft_model, adapters)`` filling PEFT's A, B.
    peft: Callable[..., tuple[list[str], int, float, Callable[..., None]]] | None = None

    def peft_side(self, base: nn.Module) -> tuple[list[str], int, float, Any]:
        """PEFT's targets, rank, alpha and adapter copier (None: the same as loraplug's)."""
        if self.peft is None:
            return self.targets(base), self.rank, self.alpha, None
        return self.peft(base, self.rank, self.alpha)
    #: Whether PEFT can hold these adapters at all (it refuses ranks not divisible by a
    #: convolution's groups).
    peft_holds: bool = True


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn().eval()
    return build


def _ids(vocab: int, *shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _randn(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _modules_of(*types: type[nn.Module]) -> Callable[[nn.Module], list[str]]:
    return lambda m: [n for n, mod in m.named_modules() if isinstance(mod, types)]


def _classifier_linears(m: nn.Module) -> list[str]:
    return [n for n, mod in m.named_modules()
            if isinstance(mod, nn.Linear) and n.startswith("classifier")]


def scenarios(quick: bool) -> list[Scenario]:
    """Every scenario; ``quick`` shrinks shapes and rounds to a smoke test."""
    q = quick
    gpt = dict(layers=2, dim=256, heads=4, vocab=1024, context=64) if q else \
        dict(layers=6, dim=768, heads=12, vocab=8192, context=256)
    gpt_ids = _ids(gpt["vocab"], *((2, 64) if q else (4, 256)))
    image = 32 if q else 224
    images = _randn(*((1, 3, image, image) if q else (8, 3, image, image)))
    vgg = f"VGG19{' (small classifier)' if q else ''}, batch {1 if q else 8} at {image}²"
    rounds, train_rounds, admin = (2, 1, 1) if q else (9, 5, 3)
    common = dict(rounds=rounds, train_rounds=train_rounds, admin_rounds=admin)
    # VGG19 at batch 8 takes seconds per call: fewer rounds.
    slow = common if q else dict(rounds=5, train_rounds=3, admin_rounds=2)
    conv = (32, 2, 28) if q else (128, 2, 112)
    return [
        Scenario(
            "linear-call", "one Linear 256→256, 1 token, r8: the per-call overhead",
            _seeded(lambda: nn.Sequential(nn.Linear(256, 256))), _randn(1, 256),
            lambda m: ["0"], rank=8, alpha=16, rounds=5 if q else 21,
            train_rounds=3 if q else 15, admin_rounds=admin,
            sample_s=0.01 if q else 0.05, entry=lambda m: m[0]),
        Scenario(
            "gpt-qv", f"GPT-style decoder {gpt['layers']}×d{gpt['dim']}, batch "
            f"{'2×64' if q else '4×256'}, r16 on q, v",
            _seeded(lambda: GPT(**gpt)), gpt_ids,
            lambda m: linear_names(m, ("q", "v")), rank=16, alpha=32, **common),
        Scenario(
            "gpt-all", f"GPT-style decoder {gpt['layers']}×d{gpt['dim']}, batch "
            f"{'2×64' if q else '4×256'}, r16 on every linear layer",
            _seeded(lambda: GPT(**gpt)), gpt_ids,
            lambda m: linear_names(m), rank=16, alpha=32, **common),
        Scenario(
            "vgg19-classifier", f"{vgg}, r8 on the classifier's linear layers",
            _seeded(lambda: vgg19(small_classifier=q)), images, _classifier_linears, rank=8,
            alpha=16, **slow),
        Scenario(
            "vgg19-all", f"{vgg}, r8 on every conv and linear layer",
            _seeded(lambda: vgg19(small_classifier=q)), images,
            _modules_of(nn.Conv2d, nn.Linear), rank=8, alpha=16, **slow),
        Scenario(
            "conv2d", f"Conv2d {conv[0]}→{conv[0]} 3×3 on {conv[1]}×{conv[0]}×{conv[2]}×"
            f"{conv[2]}, r8",
            _seeded(lambda: nn.Sequential(nn.Conv2d(conv[0], conv[0], 3, padding=1))),
            _randn(conv[1], conv[0], conv[2], conv[2]), lambda m: ["0"], rank=8, alpha=16,
            **common),
        Scenario(
            "embedding", f"Embedding {'4096×256' if q else '32000×1024'}, ids "
            f"{'4×128' if q else '16×256'}, r16",
            _seeded(lambda: nn.Sequential(nn.Embedding(*((4096, 256) if q else (32000, 1024))))),
            _ids(4096 if q else 32000, *((4, 128) if q else (16, 256))), lambda m: ["0"],
            rank=16, alpha=32, **common),
        Scenario(
            "mobilenet-convs", f"torchvision MobileNetV3-Small, batch {2 if q else 8} at "
            f"{64 if q else 224}², r4 on every conv, depthwise ones included (PEFT refuses r4 "
            "there)",
            # Its batch norms train on more than one value per channel: batch 2 when quick.
            _seeded(lambda: _mobilenet_v3_small()),
            _randn(2, 3, 64, 64) if q else images, _modules_of(nn.Conv2d), rank=4,
            alpha=8, peft_holds=False, **common),
        *_attention_scenarios(q, common),
    ]


def _attention_scenarios(q: bool, common: dict[str, int]) -> list[Scenario]:
    vit = f"{'ViT (2×d64)' if q else 'torchvision ViT-B/16'}, batch 2 at {32 if q else 224}²"
    images = _randn(2, 3, *((32, 32) if q else (224, 224)))
    gpt2 = f"transformers GPT-2 {'2×d128' if q else '6×d768'}, batch {'2×64' if q else '4×256'}"
    slow = common if q else dict(rounds=7, train_rounds=3, admin_rounds=2)
    return [
        Scenario(
            "vit-qv", f"{vit}, r16 on q and v of every attention (PEFT: the same function as "
            "its whole-attention adapter, r32)", _seeded(lambda: attention.vit(q)), images,
            attention.qv_names, rank=16, alpha=32, peft=attention.peft_qv_as_whole_attention,
            **slow),
        Scenario(
            "vit-attn", f"{vit}, r16 on every attention (in_proj and out_proj, PEFT's layout)",
            _seeded(lambda: attention.vit(q)), images, attention.attention_names, rank=16,
            alpha=32, **slow),
        Scenario(
            "gpt2-conv1d", f"{gpt2}, r16 on every Conv1D layer",
            _seeded(lambda: attention.gpt2(q)), _ids(8192, *((2, 64) if q else (4, 256))),
            attention.conv1d_names, rank=16, alpha=32, **slow),
    ]


def _mobilenet_v3_small() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small()


def _loss(out: Tensor) -> Tensor:
    return out.float().pow(2).mean()


def _train_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """forward + backward + AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model(x)).backward()
        opt.step()
    return step


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _median(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median": values[len(values) // 2], "low": values[0], "high": values[-1],
            "rounds": len(values)}


def run(sc: Scenario, *, use_peft: bool, log: Callable[[str], None],
        settle: Callable[[], float | None] = lambda: None) -> dict[str, Any]:
    """Everything measured on one scenario, as a JSON-ready dict.

    ``settle`` is called before each timed phase (to wait for a quiet machine); what it
    returns is recorded as ``busy``.
    """
    use_peft = use_peft and sc.peft_holds and peft_available()
    load_before = os.getloadavg()
    base = sc.build()
    x = sc.inputs()
    targets = sc.targets(base)
    result: dict[str, Any] = {"name": sc.name, "about": sc.about, "rank": sc.rank,
                              "alpha": sc.alpha, "targets": len(targets), "peft": use_peft}
    lp_model = loraplug_twin(base, targets, sc.rank, sc.alpha)
    peft_model = peft_twin(base, lp_model, *sc.peft_side(base)) if use_peft else None
    result["checks"] = _check(sc, base, lp_model, peft_model, x)
    result["flops"] = {"base": flops(lambda: sc.entry(base)(x)),
                       "unmerged": flops(lambda: sc.entry(lp_model)(x))}
    result["flops"]["ratio"] = (result["flops"]["unmerged"] / result["flops"]["base"]
                                if result["flops"]["base"] else None)  # a lookup has none
    log(f"{sc.name}: inject, merge, unmerge, unload")
    result["admin"] = _admin(sc, base, targets, lp_model, peft_model)
    result["file_bytes"] = _file_sizes(lp_model, peft_model)
    busy = result["busy"] = {}
    log(f"{sc.name}: forward")
    busy["forward"] = settle()
    result.update(_forward(sc, base, lp_model, peft_model, x))
    log(f"{sc.name}: training step")
    busy["train"] = settle()
    result.update(_training(sc, lp_model, peft_model, x))
    result["load"] = {"before": load_before, "after": os.getloadavg()}
    return result


@torch.no_grad()
def _check(sc: Scenario, base: nn.Module, lp_model: nn.Module, peft_model: Any,
           x: Tensor) -> dict[str, float]:
    """The same function in both libraries before anything is timed."""
    ours = sc.entry(lp_model)(x)
    checks = {"loraplug_vs_base": max_difference(ours, sc.entry(base)(x))}
    if checks["loraplug_vs_base"] == 0.0:
        raise AssertionError(f"{sc.name}: the adapters change nothing; check randomize()")
    if peft_model is not None:
        checks["loraplug_vs_peft"] = max_difference(ours, sc.entry(peft_model.get_base_model())(x))
        if checks["loraplug_vs_peft"] > 1e-4:
            raise AssertionError(f"{sc.name}: loraplug and PEFT outputs differ: {checks}")
    return checks


def _admin(sc: Scenario, base: nn.Module, targets: list[str], lp_model: nn.Module,
           peft_model: Any) -> dict[str, Any]:
    """inject, merge, unmerge and unload; merge against reading and writing each weight."""
    times: dict[str, dict[str, list[float]]] = {
        k: {"loraplug": [], "peft": []} for k in ("inject", "merge", "unmerge", "unload")}
    times["merge"]["read_write"] = []
    for _ in range(sc.admin_rounds):
        fresh = copy.deepcopy(base)
        times["inject"]["loraplug"].append(seconds(
            lambda m=fresh: lp.inject_lora(m, target=targets, rank=sc.rank, alpha=sc.alpha)))
        times["unload"]["loraplug"].append(seconds(lambda m=fresh: lp.unload(m)))
        if peft_model is not None:
            from peft import get_peft_model

            made: list[Any] = []
            config = peft_config(*sc.peft_side(base)[:3])
            fresh = copy.deepcopy(base)
            times["inject"]["peft"].append(seconds(
                lambda m=fresh, c=config, made=made: made.append(get_peft_model(m, c))))
            times["unload"]["peft"].append(seconds(made[0].unload))
    ours = copy.deepcopy(lp_model)
    weights = [layer.weight for _, layer in lp_layers(ours)]
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
        "loraplug": (lambda: lp.merge(ours), lambda: lp.unmerge(ours)),
        "read_write": (lambda: _touch(weights), None),
    }
    if peft_model is not None:
        theirs = copy.deepcopy(peft_model)
        pairs["peft"] = (lambda: peft_merge(theirs), lambda: peft_unmerge(theirs))
    with torch.no_grad():
        for _ in range(sc.admin_rounds * 2):
            for key, (merge, unmerge) in pairs.items():
                times["merge"][key].append(seconds(merge))
                if unmerge is not None:
                    times["unmerge"][key].append(seconds(unmerge))
    return {k: {who: _median(v) for who, v in d.items() if v} for k, d in times.items()}


def _forward(sc: Scenario, base: nn.Module, lp_model: nn.Module, peft_model: Any,
             x: Tensor) -> dict[str, Any]:
    """Base, unmerged and merged forward, interleaved, under no_grad."""
    merged = copy.deepcopy(lp_model)
    lp.merge(merged)
    calls = {"base": sc.entry(base), "loraplug": sc.entry(lp_model),
             "loraplug_merged": sc.entry(merged)}
    if peft_model is not None:
        peft_merged = copy.deepcopy(peft_model)
        peft_merge(peft_merged)
        calls["peft"] = sc.entry(peft_model.get_base_model())
        calls["peft_merged"] = sc.entry(peft_merged.get_base_model())
    with torch.no_grad():
        fns = {k: (lambda f=f: f(x)) for k, f in calls.items()}
        unmerged = fns["loraplug"]()
        checks = {k: max_difference(fns[k](), unmerged) for k in fns if k.endswith("merged")}
        if max(checks.values()) > 1e-4:
            raise AssertionError(f"{sc.name}: merged and unmerged outputs differ: {checks}")
        inner = calibrate(fns["base"], sc.sample_s) if sc.sample_s else 1
        timing = interleaved(fns, rounds=sc.rounds, inner=inner)
    ratio = {k: timing.ratio(k, "base") for k in fns if k != "base"}
    if "peft" in fns:
        ratio["peft_over_loraplug"] = timing.ratio("peft", "loraplug")
    return {"forward": {k: s.as_dict() for k, s in timing.stats.items()}, "forward_ratio": ratio,
            "merged_checks": checks}


def _training(sc: Scenario, lp_model: nn.Module, peft_model: Any, x: Tensor) -> dict[str, Any]:
    """forward + backward + AdamW, interleaved, and the peak memory of one step."""
    models = {"loraplug": lp_model}
    if peft_model is not None:
        models["peft"] = peft_model.get_base_model()
    steps = {}
    for key, model in models.items():
        model.train()
        steps[key] = _train_step(sc.entry(model), x)
    inner = calibrate(steps["loraplug"], sc.sample_s) if sc.sample_s else 1
    timing = interleaved(steps, rounds=sc.train_rounds, inner=inner)
    result = {"train": {k: s.as_dict() for k, s in timing.stats.items()},
              "train_peak_bytes": {k: peak_memory(step) for k, step in steps.items()}}
    if "peft" in steps:
        result["train_ratio"] = {"loraplug_over_peft": timing.ratio("loraplug", "peft")}
    return result


@torch.no_grad()
def _touch(weights: list[Tensor]) -> None:
    # The floor for a merge: read and write every merged weight once.
    for w in weights:
        w.mul_(1.0)


def _file_sizes(lp_model: nn.Module, peft_model: Any) -> dict[str, int]:
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(lp, "save_adapter"):
            lp.save_adapter(lp_model, Path(tmp, "loraplug"))
            sizes["loraplug"] = _folder_bytes(Path(tmp, "loraplug"))
        if peft_model is not None:
            peft_model.save_pretrained(Path(tmp, "peft"))
            sizes["peft"] = _folder_bytes(Path(tmp, "peft"))
    return sizes
