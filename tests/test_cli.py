"""The ``loraplug`` command line: targets, inspect, merge, and its error handling.

Models are named to the CLI as ``test_cli:<function>``: pytest puts this directory on
``sys.path``, so the functions below are importable as ``package.module:callable``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import assert_close, delta
from safetensors.torch import load_file, save_file
from torch import nn

import loraplug as lp
from loraplug._cli import main

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- models for MODEL
def tiny_model() -> nn.Module:
    """Conv2d(3→4, k3) · ReLU · Flatten · Linear(64→5) · Linear(5→2), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 2))


def grouped_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8))


def needs_real_data() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2))
    float(model[0].weight.detach().sum())  # reads data: impossible on the meta device
    return model


def returns_int() -> int:
    return 3


def raises() -> nn.Module:
    raise RuntimeError("no such config")


NOT_CALLABLE = 3
INSTANCE = nn.Sequential(nn.Linear(2, 2))
MODEL = "test_cli:tiny_model"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- help, entry point
def test_help_of_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["targets"], ["inspect"], ["merge"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: loraplug {' '.join(argv)}".rstrip() + " ")
    assert main([]) == 2  # no command: the overview, and a failing status
    assert "targets" in capsys.readouterr().out


def test_python_dash_m_runs_and_fails_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "loraplug", "--version"], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == f"loraplug {lp.__version__}"
    bad = subprocess.run([sys.executable, "-m", "loraplug", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("loraplug inspect: error: ")


# What the `loraplug` console script that pip writes into bin/ runs. Its sys.path starts
# with bin/, not with the current directory as `python -m loraplug`'s does.
CONSOLE_SCRIPT = "import sys\nfrom loraplug.__main__ import main\nsys.exit(main())\n"


@pytest.mark.parametrize("launcher", ["console script", "python -m"])
def test_model_builder_in_the_current_directory(tmp_path: Path, launcher: str) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "loraplug").write_text(CONSOLE_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymodels.py").write_text(
        "from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Linear(4, 3))\n")
    command = [sys.executable, str(tmp_path / "bin" / "loraplug")] \
        if launcher == "console script" else [sys.executable, "-m", "loraplug"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([*command, "targets", "mymodels:net", "-t", "0", "-r", "1"],
                        capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"^\*\s+0\s+nn\.Linear\s+3×4", ok.stdout, re.M)
    missing = subprocess.run([*command, "targets", "othermodels:net"], capture_output=True,
                             text=True, env=env, cwd=work, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr == (
        "loraplug targets: error: cannot import 'othermodels' for MODEL 'othermodels:net': "
        f"no module 'othermodels' in the current directory ({work}) or the installed "
        "packages\n")


def test_current_directory_leaves_sys_path_as_it_was(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here_models.py").write_text(
        "from torch import nn\n\ndef net():\n    return nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "here_models", raising=False)
    before = list(sys.path)
    assert run(capsys, "targets", "here_models:net")[0] == 0
    assert sys.path == before


# --------------------------------------------------------------------------- bad arguments
BAD_ARGUMENTS = [
    (["bogus"], 2, r"invalid choice: 'bogus'"),
    (["targets"], 2, r"required: MODEL"),
    (["targets", MODEL, "--rank", "x"], 2, r"invalid int value"),
    (["targets", "resnet18"], 2, r"not torchvision:NAME or package\.module:callable"),
    (["targets", "torchvision:resnet1"], 2, r"no model 'resnet1'; did you mean resnet18"),
    (["targets", "no_such_package_xyz:build"], 1, r"cannot import 'no_such_package_xyz'"),
    (["targets", "test_cli:missing"], 1, r"test_cli has no attribute 'missing'"),
    (["targets", "test_cli:NOT_CALLABLE"], 1, r"is a int; expected a callable"),
    (["targets", "test_cli:returns_int"], 1, r"returned a int; expected an nn\.Module"),
    (["targets", "test_cli:raises"], 1, r"building test_cli:raises failed: RuntimeError: no such"),
    (["targets", MODEL, "--rank", "0"], 2, r"--rank must be a positive integer; received 0"),
    (["targets", MODEL, "-t", "head*"], 1, r"target pattern 'head\*' matches no module"),
    (["targets", MODEL, "-t", "re:(["], 2, r"not a regular expression"),
    (["targets", MODEL, "-t", "type:Nope"], 2, r"'Nope' is not a module class"),
    (["targets", MODEL, "-t", "type:os.path"], 2, r"'os\.path' is not a module class"),
    (["inspect"], 2, r"required: ADAPTER_DIR"),
    (["merge", "--model", MODEL], 2, r"required: --weights, --adapter, --out"),
]


@pytest.mark.parametrize(("argv", "code", "message"), BAD_ARGUMENTS)
def test_bad_arguments_give_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                     code: int, message: str) -> None:
    got, out, err = run(capsys, *argv)
    assert got == code
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("loraplug")
    assert re.search(message, err), err


def test_torchvision_missing_is_one_line(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    code, _, err = run(capsys, "targets", "torchvision:resnet18")
    assert code == 1
    assert re.fullmatch(r"loraplug targets: error: torchvision:NAME needs torchvision: pip "
                        r"install torchvision\n", err)


# --------------------------------------------------------------------------- targets
def lora_params(shape: tuple[int, ...], rank: int) -> int:
    """A + B sizes from a weight shape: Linear (out, in), Conv (out, in/g, k…), groups 1."""
    out, *rest = shape
    return rank * math.prod(rest) + out * rank


def rows_of(out: str) -> dict[str, list[str]]:
    """layer -> [mark, type, weight, LoRA, params, path] from the targets table."""
    rows = {}
    for line in out.splitlines()[2:]:
        if not line.strip() or ": " in line:  # the legend under the table
            break
        mark, rest = line[:1].strip(), line[1:].split()
        rows[rest[0]] = [mark, *rest[1:]]
    return rows


def test_targets_marks_what_inject_would_wrap(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", MODEL, "-t", "type:Linear", "-t", "0", "-x", "4",
                       "--rank", "2")
    assert code == 0
    rows = rows_of(out)
    model = tiny_model()
    wrapped = lp.find_targets(model, [nn.Linear, "0"], exclude="4")
    assert sorted(n for n, r in rows.items() if r[0] == "*") == wrapped == ["0", "3"]
    assert set(rows) == {"0", "3", "4"}  # ReLU and Flatten hold no parameters
    assert rows["0"][1:4] == ["nn.Conv2d", "4×3×3×3", "LoRAConv2d"]
    expected = {"0": lora_params((4, 3, 3, 3), 2), "3": lora_params((5, 64), 2)}
    assert {n: int(rows[n][4].replace(",", "")) for n in wrapped} == expected
    # The same numbers from a real injection.
    lp.inject_lora(model, target=[nn.Linear, "0"], exclude="4", rank=2)
    added = lp.summary(model).lora_parameters
    total = sum(p.numel() for p in tiny_model().parameters())
    assert f"2 layers selected (*); rank 2 adds {added:,} parameters to the model's {total:,}" \
        in out


def test_targets_on_torchvision_model_matches_injection(
        capsys: pytest.CaptureFixture[str]) -> None:
    torchvision = pytest.importorskip("torchvision")
    code, out, _ = run(capsys, "targets", "torchvision:resnet18", "-t", "layer4.*.conv?",
                       "-t", "re:fc", "-r", "16")
    assert code == 0
    model = torchvision.models.resnet18()
    wrapped = lp.inject_lora(model, target=["layer4.*.conv?", re.compile("fc")], rank=16)
    rows = rows_of(out)
    assert sorted(n for n, r in rows.items() if r[0] == "*") == wrapped
    assert f"rank 16 adds {lp.summary(model).lora_parameters:,} parameters" in out
    assert rows["layer1.0.bn1"][1:3] == ["nn.BatchNorm2d", "64"]  # listed, not supported
    assert len(rows["layer1.0.bn1"]) == 3


def test_targets_without_pattern_lists_every_layer(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:grouped_model")
    assert code == 0
    rows = rows_of(out)
    assert rows == {"0": ["", "nn.Conv2d", "8×2×3×3", "LoRAConv2d"],
                    "1": ["", "nn.BatchNorm2d", "8"]}
    # (optional packages' types, registered by name, are listed too: bitsandbytes.nn...)
    assert "\n1 layer can take LoRA (" in out and "nn.Conv1d, nn.Conv2d" in out
    assert "pass --target PATTERN" in out


def test_targets_counts_a_grouped_conv_at_any_rank(capsys: pytest.CaptureFixture[str]) -> None:
    # A shared by the 2 groups (3 · 2·3·3), B per output channel (8 · 3).
    code, out, _ = run(capsys, "targets", "test_cli:grouped_model", "-t", "0", "-r", "3")
    assert code == 0
    row = rows_of(out)["0"]
    assert row[0] == "*" and row[-2:] == [f"{3 * 18 + 8 * 3}", "weight"]


def test_targets_shows_the_path_and_bare_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:attention_model", "-t", "head",
                       "-p", "attn.in_proj_weight", "-r", "2")
    assert code == 0
    rows = rows_of(out)
    assert rows["head"][-1] == "branch"
    assert rows["attn.in_proj_weight"][0] == "*" and rows["attn.in_proj_weight"][-2:] == [
        f"{2 * (8 + 24)}", "weight"]
    assert "2 layers selected (*)" in out


def attention_model() -> nn.Module:
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    model.head = nn.Linear(8, 2)
    return model


def test_targets_shows_the_parts_of_attention(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:attention_model", "-t", "type:Linear")
    assert code == 0
    rows = rows_of(out)
    assert rows["attn.out_proj"][0] == "*" and rows["head"][0] == "*"
    assert {"attn", "attn.q", "attn.k", "attn.v"} <= set(rows) and rows["attn.q"][0] == ""
    code, out, _ = run(capsys, "targets", "test_cli:attention_model", "-t", "attn.q", "-t",
                       "attn.v", "-r", "2")
    assert code == 0
    marked = {name for name, row in rows_of(out).items() if row[0] == "*"}
    assert marked == {"attn.q", "attn.v"}




def encoder_model() -> nn.Module:
    torch.manual_seed(0)
    model = attention_model()
    model.enc = nn.TransformerEncoderLayer(8, 2, 16)
    return model


def test_targets_wraps_attention_and_the_encoder_layer(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:encoder_model", "-t", "type:Linear", "-r", "2")
    assert code == 0
    marked = sorted(n for n, r in rows_of(out).items() if r[0] == "*")
    assert marked == lp.inject_lora(encoder_model(), target=nn.Linear, rank=2) == [
        "attn.out_proj", "enc.linear1", "enc.linear2", "enc.self_attn.out_proj", "head"]


class Picky(nn.Linear):
    """A Linear whose LoRA layer takes even ranks only: a layer type that refuses ranks."""


@lp.register_lora_layer(Picky)
class LoRAPicky(lp.LoRALinear):
    """LoRA on :class:`Picky`, refusing odd ranks."""

    def check_rank(self, rank: int) -> str | None:
        return None if rank % 2 == 0 else f"takes even ranks only; received rank={rank}."


def picky_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.block = nn.Module()
    model.block.p1, model.block.p2 = Picky(8, 8), Picky(8, 8)
    model.head = nn.Linear(8, 4)
    return model


def test_targets_counts_only_what_inject_would_wrap(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:picky_model", "-t", "type:Linear", "-r", "3")
    assert code == 1
    rows = rows_of(out)
    refused = ["block.p1", "block.p2"]
    assert [n for n, r in rows.items() if r[0] == "!"] == refused
    assert all(len(rows[n]) == 4 for n in refused)  # no parameters counted for them
    assert "\n1 layer selected (*); rank 3 adds 36 parameters" in out  # head: 3·8 + 4·3
    assert "2 more layers selected cannot take it (!)" in out
    # The advice is for the command line: no Python in it.
    assert "lambda" not in out and "exclude=" not in out
    advice = re.search(r"^To go ahead: --rank 4 fits every selected layer; or leave the ! "
                       r"layers out with (.*)$", out, re.M).group(1)
    assert advice == "--exclude '*.p1' --exclude '*.p2'"
    # Following it, nothing is refused, and inject_lora wraps exactly the layers marked *.
    exclude = re.findall(r"--exclude '([^']+)'", advice)
    code, out, _ = run(capsys, "targets", "test_cli:picky_model", "-t", "type:Linear",
                       "-r", "3", *(f"--exclude={p}" for p in exclude))
    assert code == 0 and "!" not in "".join(r[0] for r in rows_of(out).values())
    wrapped = lp.inject_lora(picky_model(), target=nn.Linear, exclude=exclude, rank=3)
    assert [n for n, r in rows_of(out).items() if r[0] == "*"] == wrapped == ["head"]


def test_targets_listing_counts_layers_their_owners_read(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The encoder's linear1/linear2 are read by its fast path: they take LoRA like any
    # other layer; so do the attentions and their parts.
    code, out, _ = run(capsys, "targets", "test_cli:encoder_model")
    assert code == 0
    rows = rows_of(out)
    assert "\n13 layers can take LoRA" in out and not any(r[0] == "!" for r in rows.values())
    for name, row in rows.items():
        if len(row) > 3:  # a LoRA layer type
            assert name in lp.inject_lora(encoder_model(), target=name, rank=2)


def test_messages_read_as_sentences(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run(capsys, "targets", "test_cli:encoder_model", "-t", "attn.out_prj")
    assert ".;" not in err
    assert re.search(r"Close module names: \[[^]]*\]\. Patterns are globs", err), err


def test_targets_warns_when_rank_exceeds_the_layer(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", MODEL, "-t", "4", "-r", "4")
    assert code == 0
    assert rows_of(out)["4"][0] == "*"  # wrapped all the same
    assert "note: 4: rank 4 exceeds the rank ΔW can have there (2)" in out


def test_targets_accepts_a_module_instance(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:INSTANCE", "-t", "0", "-r", "1")
    assert code == 0
    assert rows_of(out) == {"0": ["*", "nn.Linear", "2×2", "LoRALinear", "4", "branch"]}


def test_targets_builds_for_real_when_meta_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "targets", "test_cli:needs_real_data", "-t", "type:nn.Linear",
                       "-r", "1")
    assert code == 0
    assert rows_of(out) == {"0": ["*", "nn.Linear", "2×3", "LoRALinear", "5", "branch"]}


# --------------------------------------------------------------------------- inspect
def adapted_tiny() -> nn.Module:
    """tiny_model with adapters on 0 (rank 2, alpha 4) and 3 (rank 4, alpha 2), B random."""
    model = tiny_model()
    lp.inject_lora(model, target="0", rank=2, alpha=4)
    lp.inject_lora(model, target="3", rank=4, alpha=2)
    torch.manual_seed(1)
    for name in (0, 3):
        nn.init.normal_(model[name].lora_B["default"])
    return model


def table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        name, *cells = line.split()
        rows[name] = cells
    return rows


def test_inspect_describes_a_saved_adapter(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    model = adapted_tiny()
    lp.save_adapter(model, tmp_path / "a")
    code, out, err = run(capsys, "inspect", str(tmp_path / "a"))
    assert (code, err) == (0, "")
    assert "written   by loraplug" in out and "adapter name 'default'" in out
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert f"r={config['r']}" in out and '"peft_type"' not in out
    rows = table(out)
    # rank, alpha, scaling, A, B, dtype, size (2 cells), finite
    assert rows["0"][:6] == ["2", "4", "2", "2×3×3×3", "4×2×1×1", "float32"]
    assert rows["3"][:6] == ["4", "2", "0.5", "4×64", "5×4", "float32"]
    assert [r[-1] for r in rows.values()] == ["yes", "yes"]
    params = 2 * 27 + 4 * 2 + 4 * 64 + 5 * 4
    assert f"2 layers, {params:,} parameters" in out and "all finite." in out


def test_inspect_flags_non_finite_tensors(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    model = adapted_tiny()
    with torch.no_grad():
        model[3].lora_A["default"][0, 0] = float("nan")
    lp.save_adapter(model, tmp_path / "a")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "a"))
    assert code == 1
    assert [r[-1] for r in table(out).values()] == ["yes", "NO"]
    assert "NaN or inf in ['3']." in out


def write_peft_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def test_inspect_reads_peft_files_and_reports_problems(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    prefix = "base_model.model."
    tensors = {prefix + "q.lora_A.weight": torch.zeros(8, 16),
               prefix + "q.lora_B.weight": torch.zeros(16, 8),
               prefix + "emb.lora_embedding_A": torch.zeros(4, 100),
               prefix + "emb.lora_embedding_B": torch.zeros(32, 4),
               prefix + "k.lora_A.weight": torch.zeros(8, 16),
               prefix + "extra.weight": torch.zeros(2)}
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True,
              "rank_pattern": {"emb": 2}, "target_modules": ["q", "emb", "k"]}
    code, out, _ = run(capsys, "inspect", str(write_peft_dir(tmp_path / "p", config, tensors)))
    assert code == 1
    assert "no loraplug metadata" in out
    rows = table(out)
    assert rows["q"][:5] == ["8", "16", f"{16 / math.sqrt(8):.4g}", "8×16", "16×8"]
    assert rows["emb"][:2] == ["4", "16"]
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert problems == [
        "problem: emb: tensors have rank 4 but rank_pattern['emb'] says 2",
        "problem: k: needs both lora_A and lora_B tensors",
        "problem: 1 tensors are not LoRA tensors: ['extra.weight']",
    ]


def test_inspect_reads_legacy_bin_without_unpickling_code(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({"fc.lora_A.weight": torch.ones(2, 3), "fc.lora_B.weight": torch.ones(4, 2)},
               path / "adapter_model.bin")
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and table(out)["fc"][:5] == ["2", "8", "4", "2×3", "4×2"]

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    torch.save({"fc.lora_A.weight": Payload()}, path / "adapter_model.bin")
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 1 and "refused to load" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- merge
def test_merge_writes_weights_the_plain_model_loads(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    base = tiny_model()
    with torch.no_grad():  # base weights that differ from the builder's own
        for p in base.parameters():
            p.add_(0.5)
    torch.save({"state_dict": base.state_dict(), "epoch": 3}, tmp_path / "base.pt")
    model = adapted_tiny()
    model.load_state_dict(base.state_dict(), strict=False)
    lp.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged.safetensors"
    code, text, err = run(capsys, "merge", "--model", MODEL, "--weights",
                          str(tmp_path / "base.pt"), "--adapter", str(tmp_path / "adapter"),
                          "--out", str(out))
    assert (code, err) == (0, "")
    assert "into 2 layers" in text
    merged = load_file(str(out))
    plain = tiny_model()
    plain.load_state_dict(merged)  # strict: exactly the original keys
    for name, kind in (("0", "conv"), ("3", "linear")):
        layer = model[int(name)]
        a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        scaling = {"0": 4 / 2, "3": 2 / 4}[name]  # alpha / rank as injected
        expected = base.state_dict()[f"{name}.weight"].double() + delta(kind, a, b, scaling)
        assert_close(merged[f"{name}.weight"], expected.float())
    assert torch.equal(merged["4.weight"], base.state_dict()["4.weight"])
    x = torch.randn(3, 3, 4, 4)
    assert_close(plain(x), model(x).detach())


def test_merge_reads_safetensors_checkpoints(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    model = adapted_tiny()
    save_file(tiny_model().state_dict(), str(tmp_path / "base.safetensors"))
    lp.save_adapter(model, tmp_path / "adapter")
    code, _, _ = run(capsys, "merge", "--model", MODEL, "--weights",
                     str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "m.safetensors"))
    assert code == 0
    plain = tiny_model()
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 3, 4, 4)
    assert_close(plain(x), model(x).detach())


def test_merge_counts_in_words(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tiny_model()
    lp.inject_lora(model, target="3", rank=1)
    lp.save_adapter(model, tmp_path / "adapter")
    save_file(tiny_model().state_dict(), str(tmp_path / "base.safetensors"))
    _, text, _ = run(capsys, "merge", "--model", MODEL, "--weights",
                     str(tmp_path / "base.safetensors"), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "m.safetensors"))
    assert f"into 1 layer of {MODEL};" in text


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def merge_errors(tmp_path: Path) -> list[tuple[list[str], int, str]]:
    good = tmp_path / "base.pt"
    torch.save(tiny_model().state_dict(), good)
    lp.save_adapter(adapted_tiny(), tmp_path / "adapter")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    torch.save({"x": _Payload()}, tmp_path / "pickle.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    whole = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"0.weight": torch.ones(1)}, tmp_path / "wrong.pt")
    other = tmp_path / "other"
    other_model = nn.Sequential(nn.Linear(3, 3))
    lp.inject_lora(other_model, target="0", rank=1)
    lp.save_adapter(other_model, other)
    adapter = str(tmp_path / "adapter")

    def argv(weights: Path | str = good, out: str = str(tmp_path / "m.safetensors"),
             adapter: str = adapter) -> list[str]:
        return ["merge", "--model", MODEL, "--weights", str(weights), "--adapter", adapter,
                "--out", out]

    return [
        (argv(out=str(tmp_path / "m.pt")), 2, r"written as safetensors; name the file "),
        (argv(out=str(tmp_path / "no" / "m.safetensors")), 1, r"directory .*no does not exist"),
        (argv(weights=tmp_path / "missing.pt"), 1, r"--weights .*missing\.pt: no such file"),
        (argv(weights=tmp_path / "broken.safetensors"), 1, r"not a readable safetensors file"),
        (argv(weights=tmp_path / "broken.pt"), 1, r"not a readable torch file"),
        (argv(weights=tmp_path / "pickle.pt"), 1, r"refused to load .*GLOBAL .*system.*arbitrary"),
        (argv(weights=tmp_path / "truncated.pt"), 1, r"truncated\.pt is not a readable torch "
         r"file \(.+\)"),
        (argv(weights=tmp_path / "list.pt"), 1, r"holds a list, not a state dict"),
        (argv(weights=tmp_path / "wrong.pt"), 1, r"does not fit test_cli:tiny_model: 5 missing "
         r"keys .* 1 of another shape \['0\.weight \(1,\) vs \(4, 3, 3, 3\)'\]"),
        (argv(adapter=str(other)), 1, r"cannot load the adapter in .*other"),
        (argv(adapter=str(tmp_path / "nothing")), 1, r"is not an adapter directory"),
    ]


def test_merge_errors_are_one_line_and_write_nothing(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    for argv, code, message in merge_errors(tmp_path):
        got, out, err = run(capsys, *argv)
        assert got == code, (argv, err)
        assert out == "" and len(err.splitlines()) == 1, err
        assert re.search(message, err), err
        assert "pwned" not in out + err
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))


def test_inspect_reports_an_invalid_config(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    tensors = {"fc.lora_A.weight": torch.zeros(2, 3), "fc.lora_B.weight": torch.zeros(4, 2)}
    config = {"peft_type": "IA3", "r": 2}
    code, out, _ = run(capsys, "inspect", str(write_peft_dir(tmp_path / "p", config, tensors)))
    assert code == 1
    assert "problem: peft_type is 'IA3'; only LoRA adapters" in out
    assert table(out)["fc"][:3] == ["2", "?", "?"]  # no usable config: alpha unknown


# --------------------------------------------------------------------------- docs/cli.md
def documented_targets_sessions() -> list[tuple[list[str], list[str]]]:
    """(argv, shown output lines) of every ``$ loraplug targets`` block in docs/cli.md."""
    text = (ROOT / "docs" / "cli.md").read_text()
    sessions = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        command, *shown = block.splitlines()
        if command.startswith("$ loraplug targets "):
            sessions.append((shlex.split(command)[3:], shown))
    return sessions


@pytest.mark.parametrize(("argv", "shown"), documented_targets_sessions())
def test_documented_targets_output_is_real(capsys: pytest.CaptureFixture[str], argv: list[str],
                                           shown: list[str]) -> None:
    pytest.importorskip("torchvision")
    _, out, err = run(capsys, "targets", *argv)  # the docs show both, as a terminal does
    actual = iter((out + err).splitlines())
    for line in shown:  # in order; "..." stands for lines left out
        if line.strip() != "...":
            assert line in actual, f"{line!r} is not in the output, in this order"
