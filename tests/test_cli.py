"""The fxprune command line, run as a user runs it: a subprocess of the installed script (or
``python -m fxprune``), checking output, exit codes and one-line errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from click.testing import CliRunner

import fxprune
from fxprune.check import schedule_pruner
from fxprune.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _command() -> list[str]:
    """The ``fxprune`` script next to this interpreter when installed (pip install -e .), else ``-m fxprune``."""
    script = shutil.which("fxprune", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "fxprune"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*_command(), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_entry_point_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fxprune"] == "fxprune.cli:main"
    assert any(d.replace(" ", "").startswith("click>=8") for d in project["dependencies"])


def test_check_lists_weights_and_skips(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruning:\n  magnitude:\n    p:\n      target_sparsity: 0.8\n      weights: ['fc.weight']\n"
                   "  end_epoch: 2\n")
    r = run("check", str(cfg), "--model", "cli_models:tiny_cnn")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"config {cfg}: valid, 1 pruner(s)"
    assert out[1].startswith("pruner p (magnitude, unstructured, local, target 0.8") and out[1].endswith("1 weight(s)")
    assert out[2].split() == ["fc.weight", "10x512", "[graph]"]
    text = r.stdout
    assert "conv.weight: prunable, but no pruner selects it" in text
    assert "bn.weight: parameter of a normalization layer (BatchNorm2d)" in text
    assert "fc.bias: shape (10,) has fewer than 2 dimensions" in text


def test_bad_config_and_bad_arguments_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning:\n  magnitude:\n    p:\n      target_sparsity: 1.5\n")
    r = run("check", str(bad))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"fxprune: config error: {bad}: pruning.magnitude.p.target_sparsity: "
                                "must be in [0, 1), got 1.5")
    typo = tmp_path / "typo.yaml"
    typo.write_text("pruning:\n  magnitude:\n    p:\n      weights: ['fc.wieght']\n")
    r = run("check", str(typo), "--model", "cli_models:tiny_cnn")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "did you mean 'fc.weight'" in r.stderr
    r = run("bogus")
    assert r.returncode == 2 and "Usage: fxprune" in r.stderr and "No such command 'bogus'" in r.stderr
    # the other bad arguments in-process (same click app, no interpreter start-up per case)
    for args in (["schedule", str(bad), "--epochs", "3", "--steps", "3"], ["check"],
                 ["check", str(bad), "--model", "nonsense"], ["schedule", "x.yaml", "--epochs", "zero"],
                 ["speedup", "--model", "cli_models:tiny_cnn", "--input-shape", "1,a"]):
        result = CliRunner().invoke(cli, args, prog_name="fxprune")
        assert result.exit_code == 2 and "Usage: fxprune" in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help_everywhere():
    r = run("--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: fxprune")
    for args in (["check"], ["schedule"], ["report"], ["speedup"]):
        result = CliRunner().invoke(cli, [*args, "--help"], prog_name="fxprune")
        assert result.exit_code == 0 and result.output.startswith(f"Usage: fxprune {args[0]}"), args


def test_schedule_prints_the_pruners_goals_and_plots(tmp_path):
    config = ROOT / "configs" / "digits_cnn.yaml"
    png = tmp_path / "goals.png"
    r = run("schedule", str(config), "--epochs", "6", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    pruner = schedule_pruner(str(config))
    names = [p.name for p in pruner.pruner_configs]
    assert lines[0].split() == ["epoch", *names]
    for epoch, line in enumerate(lines[1:7]):
        goals = pruner.goal_at(epoch)
        assert line.split() == [str(epoch), *(f"{goals[n]:.4f}" for n in names)]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_saved_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        model[0].weight[:, :3] = 0
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    r = run("report", str(path))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert rows["0.weight"][1:5] == ["4x6", "24", "12", "0.5000"]
    assert "1.weight" not in rows and "0.bias" not in rows  # 1-D tensors only with --all
    everything = run("report", "--all", str(path))
    rows = {line.split()[0]: line.split() for line in everything.stdout.splitlines()[2:]}
    assert rows["1.weight"][1:5] == ["4", "4", "0", "0.0000"] and "0.bias" in rows
    assert "1.num_batches_tracked" not in rows  # integer buffers are not weights
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    r = run("report", str(junk))
    assert r.returncode == 1 and r.stderr.startswith(f"fxprune: error: {junk}: cannot read")
    assert len(r.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.pt")], prog_name="fxprune")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_speedup_with_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruning:\n  magnitude:\n    p:\n      target_sparsity: 0.9\n  start_epoch: 0\n  end_epoch: 0\n")
    r = run("speedup", "--model", "cli_models:tiny_cnn", "--config", str(cfg), "--input-shape", "2,3,8,8",
            "--no-measure", "--markdown")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| layer |")
    conv = lines[2].split(" | ")
    assert conv[0] == "| conv" and conv[3] == "0.898" and conv[5] == f"{2 * 8 * 8 * 8 * 27:,}"
    assert "**Verdict:**" in r.stdout
    result = CliRunner().invoke(cli, ["speedup", "--model", "cli_models:tiny_cnn"], prog_name="fxprune")
    assert result.exit_code == 2 and "--input-shape" in result.output


def test_report_of_a_compact_file_matches_the_state_dict(tmp_path):
    """``fxprune report`` on a ``save_sparse`` file prints the same table as on the model's torch.save'd state_dict."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:, ::4] = 0  # 25% zeros
        model[2].weight[:, 1:] = 0  # 87.5% zeros: stored sparse
    compact, dense = tmp_path / "m.safetensors", tmp_path / "m.pt"
    fxprune.save_sparse(model, compact)
    torch.save(model.state_dict(), dense)
    from_compact, from_dense = run("report", str(compact)), run("report", str(dense))
    assert from_compact.returncode == 0, from_compact.stderr
    assert from_compact.stdout == from_dense.stdout
    rows = {line.split()[0]: line.split() for line in from_compact.stdout.splitlines()[2:] if line.strip()}
    assert rows["2.weight"][1:5] == ["4x8", "32", "28", "0.8750"]
    assert rows["0.weight"][1:5] == ["8x16", "128", "32", "0.2500"]


def test_model_specs(tmp_path):
    import json

    import pytest

    from fxprune.model_spec import build_model, example_input, parse_shape

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 16,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                               "vocab_size": 50}))
    bert = build_model(f"hf:{cfg}")
    assert type(bert).__name__ == "BertModel" and not bert.training
    ids = example_input(bert, f"hf:{cfg}", (2, 7))
    assert ids.shape == (2, 7) and ids.dtype == torch.int64 and int(ids.max()) < 50
    assert type(build_model("torchvision:resnet18")).__name__ == "ResNet"
    assert example_input(build_model("cli_models:tiny_cnn"), "cli_models:tiny_cnn", (1, 3, 8, 8)).shape == (1, 3, 8, 8)
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    for spec, message in (("resnet50", "must look like"), ("cli_models:missing", "no callable 'missing'"),
                          ("no_such_module_xyz:f", "cannot build"), (f"hf:{tmp_path}/none.json", "not a file")):
        with pytest.raises(ValueError, match=message):
            build_model(spec)
    with pytest.raises(ValueError, match="positive integers"):
        parse_shape("0,3")
