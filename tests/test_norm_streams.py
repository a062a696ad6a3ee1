"""Residual streams through LayerNorm / RMSNorm / GroupNorm are pruned exactly (issue 11, items 1 and 4).

Oracles: the masked model itself (``convert(physical=True)`` must compute what
the prepared model computes, on an input ``prepare`` never saw), and for the
norms a slow reference built from scratch: a fresh module of the norm's own
class constructed for the kept channels, given the kept entries of its
weights, run on the kept channels of the input.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.structured import channel_plan_of, channel_report
from fxprune.structured.importance import kept_count
from fxprune.structured.norms import KEEP


class ScaledRMSNorm(nn.Module):
    """Gemma-style RMSNorm written by hand: ``(1 + weight)``, statistics in float32; known by behaviour only."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """torchvision convnext's LayerNorm2d: normalizes dim 1 of ``(N, C, H, W)`` by permuting."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


TOKEN_NORMS = {"layernorm": lambda d: nn.LayerNorm(d), "rmsnorm": lambda d: nn.RMSNorm(d),
               "scaled_rms": ScaledRMSNorm, "no_affine": lambda d: nn.LayerNorm(d, elementwise_affine=False)}
MAP_NORMS = {"groupnorm": lambda d: nn.GroupNorm(2, d), "layernorm2d": ChannelsFirstLayerNorm}


class TokenBlock(nn.Module):
    def __init__(self, d: int, h: int, norm):
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TokenStack(nn.Module):
    """A pre-norm residual MLP stack over tokens: embedding in, norm and head out."""

    def __init__(self, d: int, h: int, blocks: int, norm):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.blocks = nn.Sequential(*(TokenBlock(d, h, norm) for _ in range(blocks)))
        self.norm, self.head = norm(d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.inp(x))))


class MapBlock(nn.Module):
    def __init__(self, d: int, norm):
        super().__init__()
        self.norm, self.conv1, self.conv2 = norm(d), nn.Conv2d(d, 2 * d, 1), nn.Conv2d(2 * d, d, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(self.norm(x))))


class MapStack(nn.Module):
    def __init__(self, d: int, blocks: int, norm):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 3, padding=1)
        self.blocks = nn.Sequential(*(MapBlock(d, norm) for _ in range(blocks)))
        self.norm, self.head = norm(d), nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x))).mean((2, 3)))


def _randomize_vectors(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _prune(model, example, goal=0.5, **keys):
    cfg = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": goal, "schedule": "oneshot", **keys}},
           "start_epoch": 0, "end_epoch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, cfg, example_inputs=example)
    prepared.pruner.on_epoch_begin(0)
    shrunk = fxprune.convert(prepared, physical=True)
    return prepared.eval(), shrunk.eval()


def _reference_norm(original: nn.Module, kind: str, kept: torch.Tensor) -> nn.Module:
    """The slow oracle: a new module of the norm's class for ``len(kept)`` channels with the kept weights."""
    k = len(kept)
    table = {**TOKEN_NORMS, **MAP_NORMS}
    ref = table[kind](k)
    with torch.no_grad():
        for name, p in original.named_parameters():
            getattr(ref, name).copy_(p[kept])
    if hasattr(original, "eps"):
        ref.eps = original.eps
    return ref.eval()


def _assert_fxprune_free(model: nn.Module) -> None:
    from fxprune.masked import MaskedParameter
    from fxprune.structured.norms import _MaskedNormForward

    for name, m in model.named_modules():
        assert not isinstance(m, MaskedParameter), name
        assert KEEP not in m._buffers, name
        assert not isinstance(m.__dict__.get("forward"), _MaskedNormForward), name
    assert not any("fxprune" in k for k in model.state_dict())


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(sorted(TOKEN_NORMS) + sorted(MAP_NORMS)), d=st.integers(4, 20),
       blocks=st.integers(1, 3), goal=st.floats(0.1, 0.9), round_to=st.sampled_from([1, 2, 4]),
       min_channels=st.integers(1, 12), seed=st.integers(0, 100))
def test_generated_norm_streams_shrink_exactly(kind, d, blocks, goal, round_to, min_channels, seed):
    torch.manual_seed(seed)
    if kind in TOKEN_NORMS:
        model, x, fresh = TokenStack(d, 2 * d, blocks, TOKEN_NORMS[kind]), torch.randn(2, 5, 6), torch.randn(3, 4, 6)
    else:
        d += d % 2  # GroupNorm(2, d)
        model, x, fresh = MapStack(d, blocks, MAP_NORMS[kind]), torch.randn(2, 3, 6, 6), torch.randn(1, 3, 5, 7)
    _randomize_vectors(model)
    original = copy.deepcopy(model)
    prepared, shrunk = _prune(model, (x,), goal, round_to=round_to, min_channels=min_channels)

    # the stream is one prunable group; its kept count honours the goal, min_channels and round_to
    width = shrunk.inp.out_features if kind in TOKEN_NORMS else shrunk.stem.out_channels
    cells = 2 if kind == "groupnorm" else 1
    per = d // cells
    base = per - min(int(goal * per + 0.5), per - 1)
    assert width == cells * kept_count(per, base, cells, min_channels, round_to)
    assert width >= min(min_channels, d) and (width % round_to == 0 or width == d)
    plan = channel_plan_of(prepared)
    assert len(plan.norms) == blocks + 1 or width == d

    # shrunk == masked on an input prepare never saw
    with torch.no_grad():
        torch.testing.assert_close(shrunk(fresh), prepared(fresh), atol=1e-5, rtol=1e-4)

    # every norm of the prepared model computes over the kept channels only (slow reference)
    for name, (module, spec, _, _) in plan.norms.items():
        kept = module._buffers[KEEP].nonzero().reshape(-1)
        assert len(kept) == width
        ref = _reference_norm(original.get_submodule(name), kind, kept)
        z = torch.randn(2, 3, d) if spec.dim == -1 else torch.randn(2, d, 3, 3)
        with torch.no_grad():
            got = module(z)
            want = ref(z.index_select(spec.dim, kept))
        torch.testing.assert_close(got.index_select(spec.dim, kept), want, atol=1e-5, rtol=1e-4)
        dropped = (~module._buffers[KEEP]).nonzero().reshape(-1)
        assert not got.index_select(spec.dim, dropped).any()
        # the converted norm is a plain module of its own class, sized for the kept channels
        plain = shrunk.get_submodule(name)
        assert type(plain) is type(original.get_submodule(name))
        with torch.no_grad():
            torch.testing.assert_close(plain(z.index_select(spec.dim, kept)), want, atol=1e-5, rtol=1e-4)
    _assert_fxprune_free(shrunk)


@settings(max_examples=60, deadline=None)
@given(per=st.integers(1, 64), kept=st.integers(1, 64), cells=st.integers(1, 4), min_channels=st.integers(1, 80),
       round_to=st.integers(1, 16))
def test_kept_count_is_the_nearest_allowed_count(per, kept, cells, min_channels, round_to):
    kept = min(kept, per)
    got = kept_count(per, kept, cells, min_channels, round_to)
    if kept == per:
        assert got == per
        return
    target = max(kept, -(-min_channels // cells))
    allowed = [c for c in range(1, per + 1) if (c * cells) % round_to == 0 and c * cells >= min_channels]
    if not allowed:
        assert got == per
    else:  # brute force: the allowed count nearest to the target, the larger on a tie
        assert got == min(allowed, key=lambda c: (abs(c - target), -c))


def test_torchvision_convnext_stream_is_pruned():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.convnext_tiny().eval()
    _randomize_vectors(model)
    x = torch.randn(1, 3, 32, 32)
    prepared, shrunk = _prune(model, (x,))
    report = channel_report(prepared)["p"].to_dict()
    assert {why for g in report["excluded"] for why in g["plain"]} <= {"model input", "model output"}, report
    assert shrunk.features[0][0].out_channels == 48  # the stem's stream: 96 -> 48, its LayerNorm2d too
    assert tuple(shrunk.features[0][1].normalized_shape) == (48,)
    assert shrunk.features[1][0].block[2].normalized_shape == (48,)
    with torch.no_grad():
        y = torch.randn(2, 3, 40, 40)
        torch.testing.assert_close(shrunk(y), prepared(y), atol=1e-4, rtol=1e-4)
    ratio = sum(p.numel() for p in shrunk.parameters()) / sum(p.numel() for p in model.parameters())
    assert ratio < 0.3  # Torch-Pruning 1.6.1 reaches 0.26x (benchmarks/norm_streams.py)
    _assert_fxprune_free(shrunk)


def test_hugging_face_bert_hidden_size_is_pruned():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    prepared, shrunk = _prune(model, (ids,))
    assert shrunk.bert.embeddings.word_embeddings.weight.shape == (100, 32)
    assert shrunk.bert.embeddings.LayerNorm.normalized_shape == (32,)
    for layer in shrunk.bert.encoder.layer:
        assert layer.attention.self.query.weight.shape == (32, 32)  # 2 of 4 heads, 32 of 64 hidden columns
        assert layer.output.LayerNorm.weight.shape == (32,)
    assert (shrunk.config.hidden_size, shrunk.config.num_attention_heads, shrunk.config.intermediate_size) == (
        32, 2, 64)
    with torch.no_grad():
        y = torch.randint(0, 100, (3, 11))
        torch.testing.assert_close(shrunk(y).logits, prepared(y).logits, atol=1e-5, rtol=1e-4)
    _assert_fxprune_free(shrunk)


def test_llama_width_heads_and_mlp_in_one_pass_and_reload(tmp_path):
    """TinyLlama's layer shape (hidden 2048, 32 heads, 4 kv heads, MLP 5632), one layer, small vocab.

    (``benchmarks/norm_streams.py`` runs two layers with the real 32000 vocabulary.)
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                                   num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (1, 6))
    prepared, shrunk = _prune(model, (ids,), round_to=8)
    del model
    c = shrunk.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        1024, 2816, 16, 2, 64)
    assert shrunk.model.embed_tokens.weight.shape == (512, 1024) and shrunk.lm_head.weight.shape == (512, 1024)
    layer = shrunk.model.layers[0]
    assert layer.input_layernorm.weight.shape == (1024,) and layer.self_attn.q_proj.weight.shape == (1024, 1024)
    assert layer.self_attn.k_proj.weight.shape == (128, 1024) and layer.mlp.down_proj.weight.shape == (1024, 2816)
    y = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        want = prepared(y).logits
        got = shrunk(y).logits
    del prepared
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    _assert_fxprune_free(shrunk)
    shrunk.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(y).logits, got, atol=0, rtol=0)


def test_tied_embedding_and_lm_head_are_cut_together():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 7))
    prepared, shrunk = _prune(model, (ids,))
    assert shrunk.lm_head.weight is shrunk.model.embed_tokens.weight
    assert shrunk.lm_head.weight.shape == (100, 32) and shrunk.config.hidden_size == 32
    with torch.no_grad():
        y = torch.randint(0, 100, (1, 9))
        torch.testing.assert_close(shrunk(y).logits, prepared(y).logits, atol=1e-5, rtol=1e-4)


def test_unshrunk_convert_says_the_norms_differ():
    torch.manual_seed(0)
    model = TokenStack(8, 16, 1, nn.LayerNorm)
    cfg = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot"}},
           "start_epoch": 0, "end_epoch": 0}
    prepared = fxprune.prepare(model, cfg, example_inputs=(torch.randn(2, 3, 6),))
    prepared.pruner.on_epoch_begin(0)
    with pytest.warns(UserWarning, match="normalization.*kept channels.*physical=True"):
        plain = fxprune.convert(prepared)
    _assert_fxprune_free(plain)


def test_masked_norm_state_survives_state_dict_and_deepcopy():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6)
    cfg = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot"}},
           "start_epoch": 0, "end_epoch": 0}
    prepared = fxprune.prepare(TokenStack(8, 16, 2, nn.RMSNorm), cfg, example_inputs=(x,))
    prepared.pruner.on_epoch_begin(0)
    state = prepared.state_dict()
    assert sum(k.endswith(KEEP) for k in state) == 3
    fresh = fxprune.prepare(TokenStack(8, 16, 2, nn.RMSNorm), cfg, example_inputs=(x,))
    fresh.load_state_dict(state)
    twin = copy.deepcopy(prepared)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), prepared(x))
        torch.testing.assert_close(twin(x), prepared(x))
    assert twin.norm._buffers[KEEP].sum() == 4


@pytest.mark.parametrize("key,value,words", [
    ("round_to", 0, "must be an integer >= 1"),
    ("min_channels", True, "must be an integer >= 1"),
    ("round_to", 2.5, "must be an integer >= 1"),
])
def test_bad_channel_keys_name_key_and_file(tmp_path, key, value, words):
    path = tmp_path / "prune.yaml"
    path.write_text(f"pruning:\n  magnitude:\n    p: {{pattern: channel, {key}: {str(value).lower()}}}\n")
    with pytest.raises(fxprune.ConfigError) as err:
        fxprune.load_config(path)
    assert f"pruning.magnitude.p.{key}" in str(err.value) and str(path) in str(err.value) and words in str(err.value)


def test_channel_keys_need_the_channel_pattern(tmp_path):
    path = tmp_path / "prune.yaml"
    path.write_text("pruning:\n  magnitude:\n    p: {round_to: 8}\n")
    with pytest.raises(fxprune.ConfigError, match=r"pruning\.magnitude\.p\.round_to.*pattern: channel"):
        fxprune.load_config(path)
    cfg = fxprune.load_config({"magnitude": {"p": {"pattern": "channel", "round_to": 8, "min_channels": 16}}})
    assert (cfg.pruners[0].round_to, cfg.pruners[0].min_channels) == (8, 16)
    assert fxprune.load_config(cfg.to_dict()) == cfg
