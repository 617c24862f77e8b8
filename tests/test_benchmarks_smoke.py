"""``python -m benchmarks --quick`` runs end to end and reports every scenario (no timings
are asserted: they depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["linear-call", "gpt-qv", "gpt-all", "vgg19-classifier", "vgg19-all", "conv2d",
             "embedding", "mobilenet-convs", "vit-qv", "vit-attn", "gpt2-conv1d"]


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _check_stats(stats: dict[str, float]) -> None:
    assert 0 < stats["low"] <= stats["median"] <= stats["high"]
    assert stats["rounds"] >= 1


def _check_scenario(run: dict, with_peft: bool) -> None:
    assert run["checks"]["loraplug_vs_base"] > 0  # the adapters do something
    variants = ["base", "loraplug", "loraplug_merged"]
    if with_peft:
        assert run["checks"]["loraplug_vs_peft"] <= 1e-4  # the same function in both
        variants += ["peft", "peft_merged"]
    assert sorted(run["forward"]) == sorted(variants)
    for v in variants:
        _check_stats(run["forward"][v])
    assert max(run["merged_checks"].values()) <= 1e-4
    for who in ["loraplug", "peft"] if with_peft else ["loraplug"]:
        _check_stats(run["train"][who])
        assert run["train_peak_bytes"][who] >= 0
        assert run["file_bytes"][who] > 0
        for op in ("inject", "merge", "unmerge", "unload"):
            assert run["admin"][op][who]["median"] > 0
    assert run["flops"]["unmerged"] >= run["flops"]["base"]
    assert len(run["load"]["before"]) == 3


def test_two_scenarios_run_and_report(tmp_path: Path) -> None:
    results, stdout = _run(tmp_path, "--only", "linear-call", "conv2d")
    env = results["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["cpu"]
    assert [r["name"] for r in results["scenarios"]] == ["linear-call", "conv2d"]
    assert results["mixed"] == [] and results["dora"] == []
    for run in results["scenarios"]:
        _check_scenario(run, with_peft="peft" in env)
    assert "Forward (no_grad)" in stdout and "linear-call" in stdout


@pytest.mark.slow
def test_quick_benchmark_covers_every_scenario(tmp_path: Path) -> None:
    results, stdout = _run(tmp_path)
    with_peft = "peft" in results["environment"]
    assert [r["name"] for r in results["scenarios"]] == SCENARIOS
    for run in results["scenarios"]:
        # PEFT refuses rank 4 on a depthwise convolution: that scenario is loraplug's alone.
        assert run["peft"] == (with_peft and run["name"] != "mobilenet-convs")
        _check_scenario(run, run["peft"])
    assert [m["name"] for m in results["mixed"]] == ["mixed-decode", "mixed-prefill"]
    for mixed in results["mixed"]:
        assert all(v <= 1e-4 for v in mixed["checks"].values())
        for stats in mixed["forward"].values():
            _check_stats(stats)
    assert "Mixed adapters in one batch" in stdout
    assert {(r["dtype"], r["adapters"]) for r in results["merge_exact"]} == {
        (d, a) for d in ("float32", "bfloat16", "float16") for a in ("small", "trained", "large")}
    for row in results["merge_exact"]:
        assert row["drift"]["exact"] == 0.0 and 0 < row["side_per_weight_byte"] < 1.2
        assert row["time"]["exact"]["merge"] > 0
    assert "Exact merge" in stdout


def test_against_another_checkout_compares_both_versions(tmp_path: Path) -> None:
    # This checkout against itself: the outputs agree, and every ratio is reported.
    out = tmp_path / "against.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.against", str(ROOT), "--quick", "--only",
         "linear-call", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["name"] == "linear-call" and result["difference"] == 0.0
    for phase in ("forward", "train", "merge_unmerge"):
        assert result[phase]["this_over_other"] > 0
    assert "linear-call" in proc.stdout and "this ÷ other" in proc.stdout


@pytest.mark.slow
def test_the_qlora_scenario_runs_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="the qlora scenario needs bitsandbytes")
    pytest.importorskip("transformers", reason="the qlora scenario needs transformers")
    results, stdout = _run(tmp_path, "--only", "qlora")
    q = results["qlora"]
    assert q["checks"]["loraplug_vs_fp32"] > 0  # quantizing changes the model
    assert set(q["peak_bytes"]) >= {"loraplug", "fp32"}
    assert q["memory_ratio"]["loraplug_over_fp32"] < 1  # the nf4 step needs less
    for who, stats in q["train"].items():
        _check_stats(stats)
        assert q["peak_bytes"][who] == q["resident_bytes"][who] + q["step_peak_bytes"][who]
    if "peft" in results["environment"]:
        assert q["checks"]["loraplug_vs_peft"] <= 1e-5
        assert q["train_ratio"]["loraplug_over_peft"] > 0
    assert "QLoRA training step" in stdout


def test_dora_benchmark_runs_and_reports(tmp_path: Path) -> None:
    results, stdout = _run(tmp_path, "--only", "dora")
    assert results["scenarios"] == [] and results["mixed"] == []
    assert [d["name"] for d in results["dora"]] == ["gpt-all", "vit_b_16-mlp"]
    for dora in results["dora"]:
        assert dora["checks"]["dora_vs_base"] > 0
        if "peft" in results["environment"]:
            assert dora["checks"]["loraplug_vs_peft"] <= 1e-4  # the same DoRA in both
        for stats in dora["train"].values():
            _check_stats(stats)
    assert "DoRA training step" in stdout
