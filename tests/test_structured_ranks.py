"""Ranks from the example run: pooling over a positive dim is followed, untracked tensors keep blocking streams."""
from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.structured import channel_plan_of


def config(goal: float) -> dict:
    return {"magnitude": {"p": {"pattern": "channel", "target_sparsity": goal, "schedule": "oneshot"}},
            "start_epoch": 0, "end_epoch": 0}


def prune(model: nn.Module, example: tuple | None, goal: float = 0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), config(goal), example_inputs=example)
        prepared.pruner.on_epoch_begin(0)
        shrunk = fxprune.convert(prepared, physical=True, example_inputs=example)
    return prepared.eval(), shrunk.eval()


class PooledStream(nn.Module):
    """Embedding -> residual MLP blocks -> pooling over the sequence with a positive dim -> head."""

    def __init__(self, hidden: int, blocks: int, pool: str):
        super().__init__()
        self.embed = nn.Embedding(50, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(),
                                                  nn.Linear(2 * hidden, hidden)) for _ in range(blocks))
        self.head = nn.Linear(hidden, 3)
        self.pool = pool

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        h = h.mean(dim=1) if self.pool == "mean" else h.amax(1) if self.pool == "amax" else h.sum(1, keepdim=True)
        return self.head(h)


@settings(max_examples=8, deadline=None)
@given(hidden=st.integers(4, 12), blocks=st.integers(1, 3), pool=st.sampled_from(["mean", "amax", "sum"]),
       seq=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_pooling_with_a_positive_dim_keeps_the_stream_prunable(hidden, blocks, pool, seq, seed):
    torch.manual_seed(seed)
    ids = torch.randint(0, 50, (2, seq))
    prepared, shrunk = prune(PooledStream(hidden, blocks, pool), (ids,))
    kept = hidden - int(0.5 * hidden + 0.5)
    assert shrunk.embed.embedding_dim == kept and shrunk.head.in_features == kept
    for block in shrunk.blocks:
        assert block[0].in_features == kept and block[2].out_features == kept
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids), prepared(ids), atol=1e-5, rtol=1e-4)
    # Without an example the ranks are unknown: the pooling blocks the stream (and nothing breaks).
    prepared, shrunk = prune(PooledStream(hidden, blocks, pool), None)
    assert shrunk.embed.embedding_dim == hidden and shrunk.head.in_features == hidden


class PatchStream(nn.Module):
    """torchvision-ViT-like: a patch conv behind a reshape with a literal width, a class token, residual blocks."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.patch = nn.Conv2d(3, hidden, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, hidden))
        self.pos = nn.Parameter(torch.randn(1, 5, hidden))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                                  nn.Linear(2 * hidden, hidden)) for _ in range(2))
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        n = x.shape[0]
        x = self.patch(x).reshape(n, self.hidden, -1).permute(0, 2, 1)
        x = torch.cat([self.cls.expand(n, -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = x + block(x)
        return self.head(x[:, 0])


@settings(max_examples=5, deadline=None)
@given(hidden=st.integers(4, 10), seed=st.integers(0, 2**16))
def test_a_stream_fed_by_an_unfollowed_reshape_stays_whole(hidden, seed):
    # The stream starts behind a reshape the analysis does not follow, so it must not be cut anywhere, even
    # though the ranks (known from the example) let the class-token indexing at the end through.
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 4, 4)
    prepared, shrunk = prune(PatchStream(hidden), (x,))
    assert shrunk.head.in_features == hidden
    plan = channel_plan_of(prepared)
    for block in shrunk.blocks:
        assert block[3].out_features == hidden and block[1].out_features == 2 * hidden - hidden  # MLP units cut
    assert plan is not None
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)
