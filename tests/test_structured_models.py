"""Channel pruning on real models (the cheap rows of ``benchmarks/structured_sweep.py``).

Oracle: the masked model itself -- ``convert(physical=True)`` must compute
what the prepared model computes after the mask update, on an input that
``prepare`` has not seen, with BatchNorm statistics made non-trivial so that
a channel shrunk wrongly shows. Plus: the shrinking is real (parameters
down), and on BERT whole heads go (half of them at a 50% goal).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "structured_sweep.py"
_spec = importlib.util.spec_from_file_location("structured_sweep", _SWEEP)
sweep = importlib.util.module_from_spec(_spec)
sys.modules["structured_sweep"] = sweep  # dataclasses look their module up while the file executes
_spec.loader.exec_module(sweep)

_INTERFACE = {"model input", "model output"}


def test_mobilenet_v3_small_shrunk_equals_masked():
    pytest.importorskip("torchvision")
    res = sweep.run_case(sweep.vision_case("mobilenet_v3_small", image_size=64), repeats=1)
    assert res.rel_diff < 1e-4, res.max_abs_diff
    assert res.params_ratio < 0.8
    assert res.prunable > 20
    # only the model's interface is out of reach: the image channels and the class logits
    assert {label for label, _ in res.reasons} <= _INTERFACE, res.reasons
    assert res.heads_before == 0
    assert math.isfinite(res.latency_dense) and math.isfinite(res.latency_shrunk)


def test_tiny_bert_heads_halved_and_shrunk_equals_masked():
    pytest.importorskip("transformers")
    case = sweep.bert_case(hidden=64, layers=2, heads=4, intermediate=128, vocab=100, seq=8, name="tiny-bert")
    res = sweep.run_case(case, repeats=0, keep_model=True)
    assert res.rel_diff < 1e-4, res.max_abs_diff
    assert res.params_ratio < 0.8
    assert (res.heads_before, res.heads_after) == (8, 4)
    for layer in res.shrunk.encoder.layer:
        attn = layer.attention.self
        assert attn.num_attention_heads == 2
        assert attn.query.weight.shape == (2 * attn.attention_head_size, 64)
        assert layer.attention.output.dense.in_features == attn.query.weight.shape[0]


def test_reasons_are_counted_once_per_group_without_layer_names():
    excluded = [
        (0, 3, ["conv1"], ["input channels of node 'conv2d' (call_function conv2d) come from outside the analysed "
                           "graph or an op it does not follow"]),
        (5, 64, ["a", "b"], ["LayerNorm blocks.0.norm normalizes over these channels: removing channels ...",
                             "LayerNorm blocks.1.norm normalizes over these channels: removing channels ...",
                             "consumed by node 'reshape' (call_method reshape), an op the channel analysis does not "
                             "follow"]),
        (9, 64, ["c"], ["LayerNorm blocks.2.norm normalizes over these channels: removing channels ...",
                        "a brand-new reason about layer blocks.2.fc with 'quoted_node'"]),
    ]
    assert sweep.summarize_reasons(excluded) == [
        ("LayerNorm over channels", 2),
        ("input from outside / unfollowed op", 1),
        ("op not followed: reshape", 1),
        ("a brand-new reason about layer … with '…'", 1),
    ]
