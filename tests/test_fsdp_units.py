"""fully_shard units the traced graph inlines get a forward of their own (fxprune.fsdp_units), in one process.

A one-rank gloo group is enough for FSDP2 to shard (a mesh of one) and to run its hooks, so these
structural checks need no second process: nested units, the outlined code, outputs and gradients
equal to the unsharded prepared model's, and the error for a unit that runs twice.
"""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxprune


class Inner(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.inner = Inner(d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return x + self.out(self.inner(x))


class Nested(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class SharedTwice(nn.Module):
    """One block applied twice: back to back (``interleaved=False``) or with the root's code in between."""

    def __init__(self, interleaved: bool, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.interleaved = interleaved
        self.block = Block(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.block(x)
        if self.interleaved:
            h = torch.relu(h)
        return self.head(self.block(h))


CONFIG = {"pruning": {"magnitude": {"all": {}}, "schedule": "oneshot", "start_epoch": 0, "end_epoch": 0,
                      "target_sparsity": 0.5}}


@pytest.fixture(scope="module")
def one_rank_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _shard(prepared, units):
    from torch.distributed.fsdp import fully_shard

    for name in units:
        fully_shard(prepared.get_submodule(name))
    fully_shard(prepared)


def test_nested_units_are_outlined_and_compute_what_the_unsharded_model_does(one_rank_group):
    reference = fxprune.prepare(Nested(), CONFIG)
    reference.pruner.on_epoch_begin(0)
    sharded = copy.deepcopy(reference)
    _shard(sharded, ["blocks.0.inner", "blocks.1.inner", "blocks.0", "blocks.1"])
    x = torch.randn(5, 8, requires_grad=True)
    y = sharded(x)
    want = reference(x)
    torch.testing.assert_close(y, want)
    # the root calls the blocks, each block calls its inner unit: every FSDP unit's own forward ran
    calls = [n.target for n in sharded.graph.nodes if n.op == "call_module"]
    assert "blocks.0" in calls and "blocks.1" in calls
    assert "blocks.0.inner.fc.weight" not in calls
    outlined = sharded.blocks[0].__dict__["forward"]
    assert "self.inner(" in outlined.code and "self.out.weight()" in outlined.code
    assert "self.fc.weight()" in sharded.blocks[0].inner.__dict__["forward"].code
    # gradients reach the sharded parameters, masked like the unsharded model's
    (g,) = torch.autograd.grad(want.square().sum(), [x])
    F.mse_loss(y, torch.zeros_like(y), reduction="sum").backward()
    torch.testing.assert_close(x.grad, g)
    for t_ref, t in zip(reference.pruner.targets, sharded.pruner.targets):
        assert type(t.masked.mask).__name__ == "DTensor"
        grad = t.masked.param.grad.full_tensor()
        assert bool((grad[~t_ref.masked.mask] == 0).all()), t.name
        assert torch.equal(t.masked.mask.full_tensor(), t_ref.masked.mask)


def test_a_unit_applied_twice_back_to_back_is_outlined_once(one_rank_group):
    reference = fxprune.prepare(SharedTwice(interleaved=False), CONFIG)
    reference.pruner.on_epoch_begin(0)
    sharded = copy.deepcopy(reference)
    _shard(sharded, ["block"])
    x = torch.randn(4, 8)
    torch.testing.assert_close(sharded(x), reference(x))
    assert [n.target for n in sharded.graph.nodes if n.op == "call_module"].count("block") == 1


def test_a_unit_that_runs_twice_in_the_traced_forward_is_an_error_naming_it(one_rank_group):
    prepared = fxprune.prepare(SharedTwice(interleaved=True), CONFIG)
    _shard(prepared, ["block"])
    with pytest.raises(fxprune.PruningError, match=r"'block' runs in more than one place.*leaf_modules"):
        prepared(torch.randn(2, 8))


def test_convert_refuses_a_sharded_model_and_names_the_way_out(one_rank_group):
    prepared = fxprune.prepare(Nested(), CONFIG)
    _shard(prepared, ["blocks.0", "blocks.1"])
    prepared.pruner.on_epoch_begin(0)
    with pytest.raises(fxprune.PruningError, match="gather_prepared"):
        fxprune.convert(prepared)


def test_a_shard_written_since_the_last_re_zeroing_is_re_zeroed_before_it_is_gathered(one_rank_group):
    reference = fxprune.prepare(Nested(), CONFIG)
    reference.pruner.on_epoch_begin(0)
    sharded = copy.deepcopy(reference)
    _shard(sharded, ["blocks.0", "blocks.1"])
    x = torch.randn(4, 8)
    sharded(x).sum().backward()  # after a backward every unit is resharded, the root too
    with torch.no_grad():  # an in-place write with no pruner hook after it (it moves the version counters)
        for model in (reference, sharded):
            for t in model.pruner.targets:
                t.masked.param.add_(1.0)
    y = sharded(x)
    torch.testing.assert_close(y, reference(x))  # the reference multiplies by the mask instead
    y.sum().backward()
    for t in sharded.pruner.targets:
        local, mask = t.masked.param.detach().to_local(), t.masked.mask.to_local()
        assert bool((local[~mask] == 0).all()) and bool((local[mask] != 0).any()), t.name
