"""Memory of the training path (issue 12, item 5): in-place prepare/convert, no float mask copies where they
do not pay, an exact fast k-th selection for local masks."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune import masks as masks_module
from fxprune.errors import PruningError
from fxprune.masks import kth_smallest, local_unstructured_mask
from training_helpers import TinyNet, batches, loss_fn

ONESHOT = {"pruning": {"magnitude": {"p": {}}, "schedule": "oneshot", "target_sparsity": 0.5}}


class Untraceable(nn.Module):
    """A root fx cannot trace (data-dependent branch): children are captured from the example run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h if h.sum() > 0 else -h)


def _storage(model):
    return {n: p.data_ptr() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make, example", [(TinyNet, None), (Untraceable, (torch.randn(4, 6),))])
def test_inplace_prepare_and_convert_copy_no_weight(make, example):
    model, reference = make(), make()
    ids, ptrs = {n: id(p) for n, p in model.named_parameters()}, _storage(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, ONESHOT, inplace=True, example_inputs=example)
        expected = fxprune.prepare(reference, ONESHOT, example_inputs=example)
    # the prepared model trains the model's own parameter objects
    assert {id(p) for p in prepared.parameters()} >= set(ids.values())
    prepared.pruner.prune_now()
    expected.pruner.prune_now()
    out = fxprune.convert(prepared, inplace=True)
    assert out is model
    assert {n: id(p) for n, p in out.named_parameters()} == ids and _storage(out) == ptrs  # no copy anywhere
    want = fxprune.convert(expected)
    assert list(out.state_dict()) == list(want.state_dict())
    for (n, a), b in zip(out.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), n
    for p in out.parameters():  # nothing of fxprune is left on the tensors either
        assert not p._backward_hooks and not p._post_accumulate_grad_hooks


def test_inplace_prepare_that_fails_leaves_the_model_as_it_was():
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stranger = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(PruningError, match="holds no parameter"):
        fxprune.prepare(model, ONESHOT, inplace=True, optimizer=stranger)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(type(p) is nn.Parameter and not p._backward_hooks for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    fxprune.prepare(model, ONESHOT, inplace=True)  # and can be prepared again


def test_inplace_training_matches_the_copying_path():
    cfg = {"pruning": {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 2, "target_sparsity": 0.6}}
    runs = []
    for inplace in (False, True):
        prepared = fxprune.prepare(TinyNet(), cfg, inplace=inplace)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
        prepared.pruner.attach(opt, steps_per_epoch=3)
        for x, y in batches(9):
            opt.zero_grad()
            loss_fn(prepared, x, y).backward()
            opt.step()
        runs.append(fxprune.convert(prepared, inplace=inplace).state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_no_float_mask_copy_outside_the_training_step():
    prepared = fxprune.prepare(TinyNet(), ONESHOT, inplace=True)
    prepared.pruner.prune_now()
    assert all(t.masked._keep is None for t in prepared.pruner.targets)  # a mask update builds none
    x, y = batches(1)[0]
    loss_fn(prepared, x, y).backward()
    assert all(t.masked._keep is not None for t in prepared.pruner.targets)  # the per-step path on CPU does
    prepared.pruner.float_mask_copies = False
    assert all(t.masked._keep is None for t in prepared.pruner.targets)


def test_training_without_float_mask_copies_gives_the_same_weights():
    cfg = {"pruning": {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 1, "target_sparsity": 0.5}}
    states = []
    for copies in (True, False):
        prepared = fxprune.prepare(TinyNet(), cfg)
        prepared.pruner.float_mask_copies = copies
        opt = torch.optim.Adam(prepared.parameters(), lr=0.01)
        for epoch in range(2):
            prepared.pruner.on_epoch_begin(epoch)
            for x, y in batches(3, seed=epoch):
                prepared.pruner.on_batch_begin()
                loss = prepared.pruner.on_minibatch_end(prepared, loss_fn(prepared, x, y))
                opt.zero_grad()
                loss.backward()
                opt.step()
                prepared.pruner.on_batch_end()
        assert all(t.masked._keep is None for t in prepared.pruner.targets) == (not copies)
        states.append(copy.deepcopy(prepared.state_dict()))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    k_frac=st.floats(0.0, 1.0),
    levels=st.sampled_from([None, 3, 50]),  # None: continuous scores; else few distinct values (ties)
    seed=st.integers(0, 2**16),
)
def test_kth_smallest_is_exact(monkeypatch_module, n, k_frac, levels, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g) if levels is None else torch.randint(levels, (n,), generator=g).float()
    s[torch.rand(n, generator=g) < 0.1] = -float("inf")  # already-pruned entries
    k = max(1, min(n, round(k_frac * n)))
    assert kth_smallest(s, k).item() == torch.sort(s).values[k - 1].item()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2000), sparsity=st.floats(0.0, 0.99), ties=st.booleans(), seed=st.integers(0, 2**16),
       nan=st.booleans(), pruned=st.sampled_from([0.0, 0.2]))
def test_local_mask_matches_the_sorting_oracle(monkeypatch_module, n, sparsity, ties, seed, nan, pruned):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(4, (n,), generator=g).float() if ties else torch.rand(n, generator=g)
    if nan:
        scores[torch.rand(n, generator=g) < 0.05] = float("nan")
    mask = torch.rand(n, generator=g) >= pruned
    before = scores.clone()
    got = local_unstructured_mask(scores, mask, sparsity)
    assert torch.equal(scores.nan_to_num(-7), before.nan_to_num(-7))  # the policy's scores are not touched
    # oracle: stable sort of (pruned first, score with NaN as +inf, index); prune the first k
    k = masks_module.count_to_prune(sparsity, n)
    if k <= int((~mask).sum()):
        assert torch.equal(got, mask)
        return
    key = torch.nan_to_num(scores, nan=float("inf"))
    key[~mask] = -float("inf")
    order = torch.sort(key, stable=True).indices
    want = torch.ones(n, dtype=torch.bool)
    want[order[:k]] = False
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Take the sampled path of kth_smallest on small tensors (it starts at 2**20 entries otherwise)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(masks_module, "_KTH_DIRECT", 16)
    mp.setattr(masks_module, "_KTH_SAMPLE", 64)
    yield mp
    mp.undo()
