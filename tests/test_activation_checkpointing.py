"""Activation checkpointing survives prepare: the checkpointed part is still recomputed in backward.

Symbolic tracing would run straight through ``torch.utils.checkpoint`` and
inline the checkpointed function into the graph, silently dropping the
recomputation (and the memory it saves). The module whose forward calls
checkpoint keeps its Python forward; the checkpointed submodules keep their
masks when checkpoint re-runs them during backward (as graphs of their own
with ``example_inputs``, by their own module-level hooks without).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxprune

HALF = {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.5}


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class Stage(nn.Module):
    """Checkpoints its block (``where='stage'``); the root may checkpoint instead (``where='root'``)."""

    def __init__(self, width: int, reentrant: bool, where: str):
        super().__init__()
        self.block = Block(width)
        self.reentrant, self.where = reentrant, where

    def forward(self, x):
        if self.where == "stage":
            return checkpoint(self.block, x, use_reentrant=self.reentrant) + x
        return self.block(x) + x


class Net(nn.Module):
    def __init__(self, width: int, depth: int, reentrant: bool, where: str):
        super().__init__()
        self.stages = nn.ModuleList(Stage(width, reentrant, where) for _ in range(depth))
        self.head = nn.Linear(width, 3)
        self.reentrant, self.where = reentrant, where

    def forward(self, x):
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=self.reentrant) if self.where == "root" else stage(x)
        return self.head(x)


def counting_calls(module: nn.Module) -> dict:
    seen = {"calls": 0}
    module.register_forward_pre_hook(lambda *_: seen.__setitem__("calls", seen["calls"] + 1))
    return seen


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(2, 8),
    depth=st.integers(1, 3),
    reentrant=st.booleans(),
    where=st.sampled_from(["stage", "root"]),
    with_example=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_checkpointed_blocks_are_recomputed_with_their_masks(width, depth, reentrant, where, with_example, seed):
    torch.manual_seed(seed)
    model = Net(width, depth, reentrant, where)
    x = torch.randn(4, width, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, HALF, example_inputs=(x,) if with_example else None)
    prepared.pruner.on_epoch_begin(0)
    report = prepared.pruner.prepare_report
    # the module whose forward calls checkpoint is named with the reason
    if where == "root":
        assert "torch.utils.checkpoint" in str(report.root_error)
    else:
        for i in range(depth):
            assert "torch.utils.checkpoint" in report.fallback_leaves[f"stages.{i}"]
    watched = prepared.stages[0] if where == "root" else prepared.stages[0].block  # what checkpoint runs
    seen = counting_calls(watched)
    out = prepared(x)
    out.pow(2).sum().backward()
    assert seen["calls"] == 2, "the checkpointed block was not re-run in backward"
    plain = fxprune.convert(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.pow(2).sum().backward()
    params = dict(plain.named_parameters())
    for t in prepared.pruner.targets:
        g = t.masked.param.grad
        assert bool((g[~t.masked.mask] == 0).all()), t.name
        torch.testing.assert_close(g, params[t.name].grad * t.masked.mask, rtol=1e-5, atol=1e-6, msg=t.name)


class BranchCheckpoints(nn.Module):
    """Checkpoints only on the branch a default argument selects, like timm's ViT (``attn_mask=None``).

    fx passes a proxy for ``mask``, so a trace takes the other branch: only
    the example run shows that this forward checkpoints.
    """

    def __init__(self, width: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, 3)
        self.grad_checkpointing = True  # timm's flag

    def forward(self, x, mask=None):
        for block in self.blocks:
            if mask is not None:
                x = block(x * mask)
            elif self.grad_checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)


def test_the_example_run_shows_checkpointing_a_trace_would_miss():
    torch.manual_seed(0)
    model = BranchCheckpoints()
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, HALF, example_inputs=(x,))
    prepared.pruner.on_epoch_begin(0)
    assert "torch.utils.checkpoint" in prepared.pruner.prepare_report.root_error
    seen = counting_calls(prepared.blocks[1])
    out = prepared(x)
    out.sum().backward()
    assert seen["calls"] == 2
    torch.testing.assert_close(out, fxprune.convert(prepared)(x))
    for t in prepared.pruner.targets:
        assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name


def test_without_an_example_run_enabled_checkpointing_is_warned_about():
    with pytest.warns(fxprune.TraceFallbackWarning, match="activation checkpointing is enabled in <root>"):
        fxprune.prepare(BranchCheckpoints(), HALF)


def test_timm_grad_checkpointing_is_kept_with_example_inputs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, HALF, example_inputs=(x,))
    prepared.pruner.on_epoch_begin(0)
    seen = counting_calls(prepared.blocks[0])
    prepared(x).sum().backward()
    assert seen["calls"] == 2
    for t in prepared.pruner.targets:
        assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hugging_face_gradient_checkpointing_is_kept(mode):
    """Prepared in either mode (from_pretrained returns eval mode): checkpointing works in training."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    model = BertForSequenceClassification(config).train(mode == "train")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, {**HALF, "magnitude": {"p": {"weights": ["bert.encoder.*.weight"]}}},
                                   example_inputs=(ids,))
    prepared.pruner.on_epoch_begin(0)
    modules = prepared.pruner.prepare_report.modules
    assert "torch.utils.checkpoint" in modules["bert.encoder.layer.0"]
    seen = counting_calls(prepared.bert.encoder.layer[0].attention)
    prepared.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared(ids).logits.sum().backward()
    assert seen["calls"] == 2  # forward, and again in backward
    for t in prepared.pruner.targets:
        assert t.masked.param.grad is not None, t.name
        assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy"])
def test_checkpointed_training_resumes(how):
    """A resumed model's first forward must build the same graph as its recomputation (non-reentrant
    checkpoint compares them), whatever the hooks do in between."""
    import copy

    torch.manual_seed(0)
    model = Net(6, 2, reentrant=False, where="stage")
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, HALF, example_inputs=(x,))
    prepared.pruner.on_epoch_begin(0)
    if how == "deepcopy":
        prepared = copy.deepcopy(prepared)
    else:
        prepared.load_state_dict(prepared.state_dict())
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(2):  # no on_batch_begin: the first forward meets the weights as loaded
        loss = prepared.pruner.on_minibatch_end(prepared, prepared(x).pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        prepared.pruner.on_batch_end()
    for t in prepared.pruner.targets:
        assert bool((t.masked.param.detach()[~t.masked.mask] == 0).all()), t.name


class CheckpointedEncoder(nn.Module):
    """Checkpointed nn.TransformerEncoderLayers: module-level masking, and MultiheadAttention reads
    ``out_proj.weight`` without calling ``out_proj``."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True) for _ in range(2))
        self.reentrant = reentrant

    def forward(self, x):
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=self.reentrant)
        return x


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # prepare's no-grad example run
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("with_example", [False, True])
def test_checkpointed_attention_layers_train(reentrant, with_example):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(CheckpointedEncoder(reentrant), HALF, example_inputs=(x,) if with_example else None)
        prepared.pruner.on_epoch_begin(0)
        out = prepared(x.requires_grad_())
        out.pow(2).sum().backward()
    for t in prepared.pruner.targets:
        assert t.masked.param.grad is not None, t.name
        assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), fxprune.convert(prepared)(x))


class CheckpointsAMethod(nn.Module):
    """``checkpoint(self.mix, x)``: the recomputation reads the weights with no module call around it."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.fc = nn.Linear(6, 6)
        self.reentrant = reentrant

    def mix(self, x):
        return torch.tanh(torch.nn.functional.linear(x @ self.w, self.fc.weight, self.fc.bias))

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: this forward stays Python, its weights masked at module level
            return x
        return checkpoint(self.mix, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_method_reading_weights_directly(reentrant):
    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(CheckpointsAMethod(reentrant), HALF)
    prepared.pruner.on_epoch_begin(0)
    assert set(prepared.pruner.prepare_report.routes.values()) == {"module"}
    out = prepared(x)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, fxprune.convert(prepared)(x))
    for t in prepared.pruner.targets:
        assert bool((t.masked.param.grad[~t.masked.mask] == 0).all()), t.name
