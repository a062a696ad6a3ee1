"""Every shipped config works on a real model, and the main-job example runs end to end.

Why: configs and the example are what a newcomer runs first; a config that no
longer parses, or an example that crashes, is the first thing they would see.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxprune

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXAMPLE = REPO / "examples" / "prune_digits.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("prune_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"lpot_seed.yaml", "high_sparsity.yaml", "digits_cnn.yaml"} <= names


def test_seed_config_is_the_seeds():
    """The seed's YAML block, comments included, with its values unchanged."""
    text = (REPO / "configs" / "lpot_seed.yaml").read_text()
    for line in (
        "        # weights: ['layer1.0.conv1.weight',  'layer1.0.conv2.weight']",
        "        # target_sparsity: 0.3",
        "        # start_epoch: 1",
    ):
        assert line in text.splitlines()
    (p,) = fxprune.load_config(REPO / "configs" / "lpot_seed.yaml").pruners
    assert (p.name, p.policy, p.weights) == ("prune1", "magnitude", None)
    assert (p.start_epoch, p.end_epoch, p.frequency) == (0, 4, 1)
    assert (p.init_sparsity, p.target_sparsity, p.schedule) == (0.05, 0.25, "linear")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_prunes_to_its_targets(path: Path):
    """Load, prepare the example's CNN, run the whole schedule with the seed's hooks, convert.

    Each pruned weight must end at its pruner's target sparsity (within one
    element), and the converted model must match the prepared one.
    """
    config = fxprune.load_config(path)
    assert config.source == str(path)
    torch.manual_seed(0)
    model = _example_module().DigitsCNN()
    prepared = fxprune.prepare(model, path)
    pruner = prepared.pruner
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for epoch in range(max(p.end_epoch for p in config.pruners) + 1):
        pruner.on_epoch_begin(epoch)
        pruner.on_batch_begin()
        loss = pruner.on_minibatch_end(prepared, F.cross_entropy(prepared(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.on_batch_end()
        pruner.on_epoch_end(epoch)

    targets = {p.name: p.target_sparsity for p in config.pruners}
    assert pruner.current_goals() == pytest.approx(targets)
    report = fxprune.sparsity_report(prepared)
    assert {t.name for t in pruner.targets} == {r.name for r in report.rows if r.pruned}
    for t in pruner.targets:
        row = report[t.name]
        assert abs(row.zeros - targets[t.pruner] * row.numel) <= 1, t.name
        # zeros come from the mask, not from chance: stored pruned entries are exactly 0
        assert torch.all(t.masked.param.detach()[~t.masked.mask] == 0)
    converted = fxprune.convert(prepared)
    prepared.eval()
    converted.eval()
    torch.testing.assert_close(converted(x), prepared(x), rtol=0, atol=1e-6)


def test_example_runs_end_to_end(tmp_path: Path):
    out = tmp_path / "digits.pt"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs-dense", "1", "--epochs-prune", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    assert "CHECK FAIL" not in text
    for needle in (
        "dense  test accuracy:",
        "pruned test accuracy:",
        "TOTAL (pruned weights)",
        "CHECK ok   converted model is a DigitsCNN",
        "CHECK ok   converted logits equal the prepared model's",
        "CHECK ok   converted test accuracy",
        "CHECK ok   saved state_dict loads with strict=True",
        "all checks passed",
    ):
        assert needle in text, needle
    # The saved file is what the example claims: a plain DigitsCNN state_dict with the pruned zeros.
    fresh = _example_module().DigitsCNN()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert float((fresh.fc1.weight == 0).float().mean()) > 0.4


def test_example_rejects_a_bad_config_before_training(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning:\n  magnitude:\n    prune1: {}\n  target_sparsty: 0.5\n")
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--config", str(bad), "--out", str(tmp_path / "x.pt")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "pruning.target_sparsty" in result.stderr and "target_sparsity" in result.stderr
    assert "dense  test accuracy" not in result.stdout
