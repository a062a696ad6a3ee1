"""Weights of every Linear/Conv/Embedding/... are prunable by default, whatever their shape (issue 9, item 6)."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.masks import count_to_prune
from fxprune.plan import is_default_prunable


def _config(**keys):
    return {"pruning": {"magnitude": {"p": {}}, "schedule": "oneshot", "target_sparsity": 0.5, **keys}}


class Layers(nn.Module):
    """One of each layer kind, with shapes drawn by the test (size-1 dimensions included)."""

    def __init__(self, d_in, hidden, d_out, cin, k, n_emb):
        super().__init__()
        self.emb = nn.Embedding(n_emb, hidden)
        self.conv = nn.Conv2d(cin, hidden, k, padding=k // 2)
        self.deconv = nn.ConvTranspose1d(hidden, 1, 1)
        self.lin_in = nn.Linear(d_in, hidden)
        self.bil = nn.Bilinear(hidden, 1, hidden)
        self.head = nn.Linear(hidden, d_out)
        self.norm = nn.LayerNorm(hidden)
        self.scale = nn.Parameter(torch.ones(hidden, 1))  # a broadcast parameter: not a weight
        self.mix = nn.Parameter(torch.randn(hidden, hidden) if hidden > 1 else torch.randn(1, 1))

    def forward(self, tokens, image, x):
        h = self.emb(tokens).mean(1) + self.conv(image).mean((2, 3)) + self.lin_in(x)
        h = self.norm(h) * self.scale.reshape(-1)
        h = h @ self.mix
        h = self.bil(h, self.deconv(h.unsqueeze(-1)).squeeze(-1))
        return self.head(h)


LAYER_WEIGHTS = ["emb.weight", "conv.weight", "deconv.weight", "lin_in.weight", "bil.weight", "head.weight"]


@settings(max_examples=20, deadline=None)
@given(
    d_in=st.integers(1, 3), hidden=st.integers(1, 4), d_out=st.integers(1, 3),
    cin=st.integers(1, 2), k=st.sampled_from([1, 3]), n_emb=st.integers(1, 3),
)
def test_every_layer_weight_is_prunable_whatever_its_shape(d_in, hidden, d_out, cin, k, n_emb):
    torch.manual_seed(0)
    model = Layers(d_in, hidden, d_out, cin, k, n_emb)
    inputs = (torch.randint(0, n_emb, (2, 3)), torch.randn(2, cin, 4, 4), torch.randn(2, d_in))
    prepared = fxprune.prepare(model, _config())
    names = [t.name for t in prepared.pruner.targets]
    # the oracle: layer weights always; raw parameters only with two dims > 1; never biases, norms
    want = LAYER_WEIGHTS[:]
    if hidden > 1:
        want.insert(LAYER_WEIGHTS.index("bil.weight"), "mix")
    assert sorted(names) == sorted(want)
    prepared.pruner.prune_now()
    for t in prepared.pruner.targets:
        m = t.masked
        assert int((~m.mask).sum()) == count_to_prune(0.5, m.mask.numel()), t.name
        assert bool((m.param[~m.mask] == 0).all())
    prepared.eval()
    converted = fxprune.convert(prepared)
    assert torch.allclose(converted(*inputs), prepared(*inputs))


def test_a_model_of_only_size_one_layers_prepares():
    """Today's main raised 'no prunable weight is left' for these."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Flatten(), nn.Linear(64, 1), nn.Linear(1, 3))
    prepared = fxprune.prepare(model, _config())
    assert [t.name for t in prepared.pruner.targets] == ["0.weight", "2.weight", "3.weight"]


def test_attention_projections_and_hf_conv1d_are_layer_weights():
    mha = nn.MultiheadAttention(1, 1)  # in_proj_weight (3, 1): one dimension of size > 1 only
    assert is_default_prunable(mha, "in_proj_weight") and is_default_prunable(mha, "out_proj.weight")
    assert not is_default_prunable(mha, "in_proj_bias")
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(1, 8)  # GPT-2's value head shape: weight (8, 1)
    assert is_default_prunable(conv1d, "weight") and not is_default_prunable(conv1d, "bias")


def test_tied_weights_count_as_layer_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 1)
            self.out = nn.Linear(1, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.emb(t))

    prepared = fxprune.prepare(Tied(), _config())
    assert [t.name for t in prepared.pruner.targets] == ["emb.weight"]


def test_raw_broadcast_parameters_stay_excluded():
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.layer_scale = nn.Parameter(torch.ones(4, 1, 1))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))

        def forward(self, x):
            return self.fc(x) * self.layer_scale.reshape(4) + self.cls_token.reshape(4)

    prepared = fxprune.prepare(Scales(), _config())
    assert [t.name for t in prepared.pruner.targets] == ["fc.weight"]


def test_nm_names_a_size_one_weight_it_cannot_pattern():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1), nn.Linear(1, 8))
    with pytest.raises(ConfigError, match=r"'3\.weight'.*input features \(dim 1\) to be divisible by 4"):
        fxprune.prepare(model, _config(pattern="2:4"))
    # excluding it by name works, and the value head (8 inputs) gets the pattern
    cfg = {"pruning": {"magnitude": {"p": {"weights": ["0.weight", "2.weight"]}}, "pattern": "2:4",
                       "schedule": "oneshot", "target_sparsity": 0.5}}
    prepared = fxprune.prepare(model, cfg)
    prepared.pruner.prune_now()
    head = prepared.pruner.targets[1].masked.mask
    assert head.shape == (1, 8) and bool((head.reshape(-1, 4).sum(1) == 2).all())


def test_channel_pattern_on_size_one_heads_shrinks_exactly():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv2d(1, 8, 1)
            self.value = nn.Linear(8, 1)
            self.up = nn.Linear(1, 6)

        def forward(self, x):
            return self.up(self.value(torch.relu(self.stem(x)).mean((2, 3))))

    x = torch.randn(3, 1, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(Heads(), _config(pattern="channel"), example_inputs=(x,))
    prepared.pruner.prune_now()
    shrunk = fxprune.convert(prepared, physical=True)
    assert shrunk.stem.out_channels == 4  # the hidden channels are cut; the model's output and input are not
    assert shrunk.value.out_features == 1 and shrunk.up.out_features == 6 and shrunk.stem.in_channels == 1
    prepared.eval()
    assert torch.allclose(shrunk(x), prepared(x), atol=1e-6)
