"""Attention heads as channels: pruned whole, physically removed, outputs equal to the masked model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.structured import channel_plan_of, channel_report


class ExternalOutAttention(nn.Module):
    """Hugging Face BERT's layout: q/k/v here, the output projection in the caller; heads by ``-1``."""

    def __init__(self, hidden: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = head_dim
        self.all_head_size = heads * head_dim
        self.query = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.key = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.value = nn.Linear(hidden, heads * head_dim, bias=bias)

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.attention_head_size)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.query, self.key, self.value))
        ctx = F.scaled_dot_product_attention(q, k, v)
        return ctx.transpose(1, 2).reshape(*x.shape[:-1], -1), None


class InternalOutAttention(nn.Module):
    """Llama / HF ViT layout with the output projection inside; the forward reads ``self.num_heads``."""

    def __init__(self, hidden: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class FixedHeadsAttention(InternalOutAttention):
    """Head count baked into the code (a literal): removing a head cannot be made exact."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 4, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, attention: type, hidden: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.inp = nn.Linear(6, hidden)
        self.attn = attention(hidden, heads, head_dim, bias)
        self.dense = nn.Linear(heads * head_dim, hidden) if attention is ExternalOutAttention else None
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        h = self.inp(x)
        a = self.attn(h)
        if self.dense is not None:
            a = self.dense(a[0])
        return self.head(torch.relu(h + a))


def config(goal: float, **extra) -> dict:
    body = {"pattern": "channel", "target_sparsity": goal, "schedule": "oneshot", **extra}
    return {"magnitude": {"p": body}, "start_epoch": 0, "end_epoch": 0}


def prune(model: nn.Module, goal: float, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), config(goal), **kw)
    prepared.pruner.on_epoch_begin(0)
    return prepared.eval(), fxprune.convert(prepared, physical=True).eval()


@settings(max_examples=20, deadline=None)
@given(
    layout=st.sampled_from([ExternalOutAttention, InternalOutAttention]),
    heads=st.integers(2, 6),
    head_dim=st.integers(1, 6),
    bias=st.booleans(),
    goal=st.floats(0.2, 0.9),
    seed=st.integers(0, 2**16),
)
def test_heads_are_removed_whole_and_shrunk_equals_masked(layout, heads, head_dim, bias, goal, seed):
    torch.manual_seed(seed)
    model = Block(layout, 8, heads, head_dim, bias)
    prepared, shrunk = prune(model, goal)
    attn = shrunk.attn
    q = attn.query if layout is ExternalOutAttention else attn.q_proj
    removed = min(int(goal * heads + 0.5), heads - 1)
    assert q.weight.shape[0] == (heads - removed) * head_dim
    assert q.out_features == q.weight.shape[0]
    if layout is InternalOutAttention:
        assert attn.num_heads == heads - removed and attn.o_proj.in_features == q.weight.shape[0]
    else:
        assert attn.num_attention_heads == heads - removed and attn.all_head_size == q.weight.shape[0]
        assert shrunk.dense.in_features == q.weight.shape[0]
    # whole heads: every masked row block of q/k/v is all-pruned or all-kept
    for t in prepared.pruner.targets:
        if t.name.rpartition(".")[0].rpartition(".")[2] in ("query", "key", "value", "q_proj", "k_proj", "v_proj"):
            rows = t.masked.mask.reshape(heads, -1).any(1)
            assert int((~rows).sum()) == removed
    for shape in ((2, 5, 6), (1, 9, 6)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)


def test_the_weakest_head_goes_first():
    torch.manual_seed(0)
    model = Block(InternalOutAttention, 8, 4, 3, True)
    with torch.no_grad():
        for p in (model.attn.q_proj, model.attn.k_proj, model.attn.v_proj):
            p.weight[6:9] *= 1e-3  # head 2
        model.attn.o_proj.weight[:, 6:9] *= 1e-3
    prepared, shrunk = prune(model, 0.25)
    kept = prepared.attn.q_proj.weight.mask.reshape(4, -1).any(1)
    assert kept.tolist() == [True, True, False, True]


def test_a_head_count_baked_into_the_code_is_reported_not_pruned():
    torch.manual_seed(0)
    model = Block(FixedHeadsAttention, 8, 4, 2, True)
    prepared, shrunk = prune(model, 0.5)
    report = channel_report(prepared)["p"]
    assert "attn.q_proj.weight" in report.dense_weights
    assert not channel_plan_of(prepared).channels.attention
    assert shrunk.attn.q_proj.out_features == 8
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)


class CrossBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.attn = InternalOutAttention(8, 4, 2, True)

    def forward(self, x, y):
        return self.attn(self.a(x), self.b(y))


def test_attention_over_a_second_input_is_not_pruned():
    class TwoInput(InternalOutAttention):
        def forward(self, x, y=None):
            return super().forward(x if y is None else x + y)

    model = CrossBlock()
    model.attn = TwoInput(8, 4, 2, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), config(0.5))
    report = channel_report(prepared)["p"]
    assert "attn.q_proj.weight" in report.dense_weights
    assert any("second tracked input" in r for _, _, _, reasons in report.excluded for r in reasons)


def test_hugging_face_bert_heads_and_mlp_are_shrunk():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, {"magnitude": {"p": {
            "pattern": "channel", "weights": ["re:encoder\\..*\\.weight"], "target_sparsity": 0.5,
            "schedule": "oneshot"}}, "start_epoch": 0, "end_epoch": 0}, example_inputs=(ids,))
    prepared.pruner.on_epoch_begin(0)
    shrunk = fxprune.convert(prepared, physical=True).eval()
    prepared.eval()
    for layer in shrunk.encoder.layer:
        attn = layer.attention
        assert attn.self.query.weight.shape == (32, 64) and attn.self.num_attention_heads == 2
        assert attn.output.dense.in_features == 32 and layer.intermediate.dense.out_features == 64
    for x in (ids, torch.randint(0, 100, (3, 11))):
        with torch.no_grad():
            torch.testing.assert_close(shrunk(x).last_hidden_state, prepared(x).last_hidden_state,
                                       atol=1e-5, rtol=1e-4)


def test_hugging_face_vit_heads_with_inner_output_projection():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8)
    model = transformers.ViTModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    prepared, shrunk = prune(model, 0.5, example_inputs=(x,))
    plan = channel_plan_of(prepared)
    assert len(plan.channels.attention) == 2
    report = channel_report(prepared)["p"]
    assert len(report.head_groups) == 2 and "4 heads" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x).last_hidden_state, prepared(x).last_hidden_state, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in shrunk.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())


class KeywordBlock(nn.Module):
    """Calls its attention with the input as a keyword (CLIP, Whisper: ``self_attn(hidden_states=h)``)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = InternalOutAttention(8, 4, 2, True)
        self.mid = nn.Linear(8, 8)
        self.attn2 = InternalOutAttention(8, 4, 2, True)

    def forward(self, x):
        h = self.attn(x=self.inp(x))
        return self.attn2(x=torch.relu(self.mid(h)))


def test_attention_called_with_a_keyword_input_is_pruned():
    torch.manual_seed(0)
    prepared, shrunk = prune(KeywordBlock(), 0.5)
    assert sorted(channel_plan_of(prepared).channels.attention) == ["attn", "attn2"]
    assert shrunk.attn.num_heads == 2 and shrunk.attn2.num_heads == 2
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)


def test_llama_heads_and_gqa_groups_are_proven_with_the_example_call():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    for kv in (4, 2):
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kv)
        model = transformers.LlamaModel(cfg).eval()
        # Llama's forward needs position_embeddings: proven with the call the example run made
        prepared, shrunk = prune(model, 0.5, example_inputs=(ids,))
        assert len(channel_plan_of(prepared).channels.attention) == 2
        for layer in shrunk.layers:  # half the heads; with GQA half the key/value groups (each with its queries)
            assert layer.self_attn.q_proj.weight.shape == (32, 64)
            assert layer.self_attn.k_proj.weight.shape == (16 * kv // 2, 64)
        for x in (ids, torch.randint(0, 100, (3, 11))):
            with torch.no_grad():
                torch.testing.assert_close(shrunk(x).last_hidden_state, prepared(x).last_hidden_state,
                                           atol=1e-5, rtol=1e-4)


class GroupedAttention(nn.Module):
    """Grouped-query attention: ``kv`` key/value heads, each shared by ``heads // kv`` query heads."""

    def __init__(self, hidden: int, heads: int, kv: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.k_proj = nn.Linear(hidden, kv * head_dim)
        self.v_proj = nn.Linear(hidden, kv * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hidden)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@settings(max_examples=15, deadline=None)
@given(kv=st.integers(2, 4), group=st.integers(1, 3), head_dim=st.integers(1, 4), goal=st.floats(0.2, 0.9),
       seed=st.integers(0, 2**16))
def test_grouped_query_attention_loses_whole_groups(kv, group, head_dim, goal, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), GroupedAttention(8, kv * group, kv, head_dim), nn.Linear(8, 3))
    prepared, shrunk = prune(model, goal)
    removed = min(int(goal * kv + 0.5), kv - 1)
    attn = shrunk[1]
    assert attn.k_proj.weight.shape[0] == (kv - removed) * head_dim
    assert attn.q_proj.weight.shape[0] == (kv - removed) * group * head_dim
    assert attn.num_key_value_heads == kv - removed and attn.num_heads == (kv - removed) * group
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)
