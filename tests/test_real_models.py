"""Real architectures (CI-sized subset of ``benchmarks/model_sweep.py``) and the per-submodule fallback.

Every sweep case asserts: prepared == original before pruning, each weight at
its 50% goal, tied weights one mask / one parameter, converted == prepared,
strict load into a fresh instance, and three optimizer steps with masked
gradients and pruned weights kept at 0. The other tests pin down the per-submodule
fallback on a small synthetic model and on Hugging Face models: which parts
become graphs, that a call unlike the example run still computes the right
thing, and that deepcopy / pickle / training keep working.
"""
from __future__ import annotations

import copy
import importlib.util
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune

_SWEEP = Path(__file__).resolve().parents[1] / "benchmarks" / "model_sweep.py"
_spec = importlib.util.spec_from_file_location("model_sweep", _SWEEP)
sweep = importlib.util.module_from_spec(_spec)
sys.modules["model_sweep"] = sweep  # dataclasses look their module up while the file executes
_spec.loader.exec_module(sweep)

CI_SUBSET = {
    "resnet18": "torchvision",
    "mobilenet_v3_small": "torchvision",
    "vit_b_16": "torchvision",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "torchvision",
    "timm_vit_tiny": "timm",
    "BertModel": "transformers",
    "GPT2LMHeadModel": "transformers",
    "T5ForConditionalGeneration": "transformers",
    "LlamaForCausalLM": "transformers",
}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(CI_SUBSET))
def test_sweep_case(name):
    pytest.importorskip(CI_SUBSET[name])
    result = sweep.run_case(sweep.CASES[name])
    assert result.status == "ok"
    expected = ["capture", "goal"] + (["tied"] if sweep.CASES[name].tied else []) + ["convert", "strict-load", "train"]
    assert result.checks == expected


# ----------------------------------------------------------------------------- synthetic model
CONFIG = {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.5}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=1.0):
        if mask is not None:  # decided by the caller: None in the example run
            x = x * mask
        return torch.relu(self.fc(x)) * scale


class UntraceableRoot(nn.Module):
    """Data-dependent control flow in the root's own forward; children are plain."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.block = Block()
        self.raw = nn.Parameter(torch.randn(4, 3))

    def forward(self, x, mask=None):
        h = self.inp(x)
        if h.sum() > 1e6:
            h = h * 0
        return self.block(h, mask=mask, scale=2.0) @ self.raw


def test_untraceable_root_children_become_graphs_with_example_inputs():
    torch.manual_seed(0)
    model = UntraceableRoot()
    x = torch.randn(5, 4)
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(model, CONFIG, example_inputs=(x,))
    report = prepared.pruner.prepare_report
    assert not report.traced
    assert report.modules["inp"] == "graph" and report.modules["block"] == "graph"
    assert report.modules["<root>"].startswith("python")
    # children read their weights in their graphs; the root's own matrix is masked around the root's forward
    assert report.routes == {"inp.weight": "graph", "raw": "module", "block.fc.weight": "graph"}
    assert "module block: graph" in str(report)
    # the child runs its graph (specialized: mask=None, scale=2.0), with its class and hooks intact
    forward = prepared.block.__dict__["forward"]
    assert "relu" in forward.code and "mask" not in forward.code.split("def forward")[1].split(")")[0]
    assert isinstance(prepared.block, Block)

    prepared.pruner.on_epoch_begin(0)
    converted = fxprune.convert(prepared)
    assert "forward" not in converted.block.__dict__
    assert type(converted) is UntraceableRoot
    torch.testing.assert_close(converted(x), prepared(x), rtol=0, atol=0)

    # A call unlike the example run (a mask tensor) runs the Python forward, still masked, and warns once.
    mask = (torch.rand(5, 4) > 0.5).float()
    with pytest.warns(UserWarning, match="differs"):
        out = prepared(x, mask=mask)
    torch.testing.assert_close(out, converted(x, mask=mask), rtol=0, atol=0)
    assert forward.missed == 1

    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        torch.testing.assert_close(clone(x), prepared(x), rtol=0, atol=0)
        assert clone.block.__dict__["forward"].module is clone.block
    fresh = UntraceableRoot()
    fresh.load_state_dict(converted.state_dict(), strict=True)


def test_without_example_inputs_untraceable_root_is_masked_at_module_level():
    torch.manual_seed(0)
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(UntraceableRoot(), CONFIG)
    assert set(prepared.pruner.prepare_report.routes.values()) == {"module"}
    assert not any("forward" in m.__dict__ for m in prepared.modules())


def test_per_submodule_capture_trains_with_masked_gradients():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    with pytest.warns(fxprune.TraceFallbackWarning):
        prepared = fxprune.prepare(UntraceableRoot(), CONFIG, example_inputs=(x,))
    prepared.pruner.on_epoch_begin(0)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        prepared.pruner.on_batch_begin()
        loss = prepared(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        for t in prepared.pruner.targets:
            assert t.masked.param.grad is not None, t.name
            assert (t.masked.param.grad[~t.masked.mask] == 0).all(), t.name
        opt.step()
        prepared.pruner.on_batch_end()
    for t in prepared.pruner.targets:
        assert (t.masked.param[~t.masked.mask] == 0).all(), t.name


# ----------------------------------------------------------------------------- Hugging Face
def _bert():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    case = sweep.CASES["BertModel"]
    model = case.build().eval()
    args, kwargs = case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.TraceFallbackWarning)
        prepared = fxprune.prepare(model, sweep.CONFIG, example_inputs=(args, kwargs))
    return model, prepared, kwargs


def test_bert_layers_are_graphs_and_every_weight_is_masked_in_a_graph():
    model, prepared, kwargs = _bert()
    report = prepared.pruner.prepare_report
    assert not report.traced  # plain symbolic_trace cannot trace BertModel.forward
    assert set(report.routes.values()) == {"graph"}
    graphs = [name for name, route in report.modules.items() if route == "graph"]
    assert "encoder" in graphs and "pooler" in graphs and "encoder.layer.0.attention.self.query" in graphs
    assert type(prepared.encoder.__dict__["forward"]).__name__ == "CapturedForward"


def test_bert_call_unlike_example_and_copies():
    model, prepared, kwargs = _bert()
    prepared.pruner.on_epoch_begin(2)
    prepared.eval()
    converted = fxprune.convert(prepared).eval()
    ids = kwargs["input_ids"]
    # the example passed an attention mask; a call without one must still be right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = prepared(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, converted(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    want = prepared(**kwargs).last_hidden_state
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        torch.testing.assert_close(clone(**kwargs).last_hidden_state, want, rtol=0, atol=0)
    # moved to another dtype, the captured graphs read the moved tensors
    doubled = copy.deepcopy(prepared).double()
    torch.testing.assert_close(doubled(**kwargs).last_hidden_state.float(), want, rtol=1e-4, atol=1e-4)
