"""Fused projections: q|k|v in one layer (every layout), gate|up, and the Hugging Face models that use them."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.masked import MaskedParameter
from fxprune.structured import channel_plan_of


def prune(model: nn.Module, goal: float, example: tuple):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), {"magnitude": {"p": {
            "pattern": "channel", "target_sparsity": goal, "schedule": "oneshot"}}, "start_epoch": 0, "end_epoch": 0},
            example_inputs=example)
    prepared.pruner.on_epoch_begin(0)
    return prepared.eval(), fxprune.convert(prepared, physical=True).eval()


def clean(model: nn.Module) -> None:
    assert not any(isinstance(m, MaskedParameter) or m._forward_pre_hooks for m in model.modules())


class FusedAttention(nn.Module):
    """One projection for q, k, v in the given layout; ``kv`` key/value heads shared by ``heads // kv`` queries."""

    def __init__(self, hidden: int, heads: int, kv: int, head_dim: int, layout: str):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim, self.layout = heads, kv, head_dim, layout
        self.qkv = nn.Linear(hidden, (heads + 2 * kv) * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hidden)

    def forward(self, x):
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_key_value_heads, self.head_dim
        f = self.qkv(x)
        if self.layout == "qkv":
            q, k, v = f.split([h * d, kv * d, kv * d], dim=-1)
        else:  # per key/value group: its queries, its key, its value
            g = f.view(b, t, kv, h // kv + 2, d)
            q, k, v = g[..., :-2, :].flatten(2, 3), g[..., -2, :], g[..., -1, :]
        q = q.reshape(b, t, h, d).transpose(1, 2)
        k, v = (z.reshape(b, t, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1) for z in (k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * d))


@settings(max_examples=6, deadline=None)
@given(kv=st.integers(2, 4), group=st.integers(1, 3), head_dim=st.integers(1, 4), layout=st.sampled_from(["qkv", "ilv"]),
       goal=st.floats(0.2, 0.9), seed=st.integers(0, 2**16))
def test_a_fused_projection_loses_whole_groups_in_its_own_layout(kv, group, head_dim, layout, goal, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), FusedAttention(8, kv * group, kv, head_dim, layout), nn.Linear(8, 3))
    x = torch.randn(2, 5, 6)
    prepared, shrunk = prune(model, goal, (x,))
    spec = channel_plan_of(prepared).channels.attention["1"]
    assert spec.layout == ("qkv" if layout == "qkv" else "interleaved")  # the proof found the true order
    removed = min(int(goal * kv + 0.5), kv - 1)
    attn = shrunk[1]
    assert attn.num_key_value_heads == kv - removed and attn.num_heads == (kv - removed) * group
    assert attn.qkv.weight.shape[0] == (kv - removed) * (group + 2) * head_dim
    with torch.no_grad():
        for inp in (x, torch.randn(3, 7, 6)):
            torch.testing.assert_close(shrunk(inp), prepared(inp), atol=1e-5, rtol=1e-4)


def _causal_lm(prepared, shrunk, vocab: int) -> None:
    clean(shrunk)
    ids = torch.randint(0, vocab, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids).logits, prepared(ids).logits, atol=1e-4, rtol=1e-4)
    out = shrunk.generate(torch.randint(0, vocab, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_gpt2_c_attn_heads_and_conv1d_mlp():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    # Analysed part by part (no example input): heads and the Conv1D MLP units.
    prepared, shrunk = prune(transformers.GPT2LMHeadModel(cfg), 0.5, None)
    for block in shrunk.transformer.h:
        assert block.attn.num_heads == 2 and block.attn.split_size == 16
        assert block.attn.c_attn.weight.shape == (32, 48) and block.attn.c_attn.nf == 48
        assert block.attn.c_proj.weight.shape == (16, 32) and block.mlp.c_fc.weight.shape == (32, 64)
    _causal_lm(prepared, shrunk, 100)
    # Recorded on an example (the root is not traceable): prepare has inlined the MLP's Conv1D as
    # size/view/addmm/view, which the recording folds back into the layer, so its units are cut as well.
    torch.manual_seed(0)
    prepared, shrunk = prune(transformers.GPT2LMHeadModel(cfg), 0.5, (torch.randint(0, 100, (2, 8)),))
    for block in shrunk.transformer.h:
        assert block.attn.num_heads == 2 and block.attn.c_attn.weight.shape[1] == 48
        assert block.mlp.c_fc.weight.shape[1] == 64 and block.mlp.c_fc.nf == 64
        assert block.mlp.c_proj.weight.shape[0] == 64
    assert "mlp.c_fc.weight" not in str(fxprune.structured.channel_report(prepared))
    _causal_lm(prepared, shrunk, 100)


def test_phi3_qkv_proj_groups_and_gate_up_units():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                                  eos_token_id=0)
    prepared, shrunk = prune(transformers.Phi3ForCausalLM(cfg), 0.5, (torch.randint(0, 100, (2, 8)),))
    # The forward reads the head count from the shared config; the RMSNorm'd stream (hidden 32) is cut too.
    assert (shrunk.config.num_attention_heads, shrunk.config.num_key_value_heads, shrunk.config.hidden_size) == (2, 1, 16)
    for layer in shrunk.model.layers:
        assert layer.self_attn.qkv_proj.weight.shape == ((2 + 2) * 8, 16) and layer.self_attn.num_key_value_heads == 1
        assert layer.mlp.gate_up_proj.weight.shape == (64, 16) and layer.mlp.down_proj.weight.shape == (16, 32)
    _causal_lm(prepared, shrunk, 100)


@pytest.mark.parametrize("variant", [dict(new_decoder_architecture=True, num_kv_heads=2), dict(multi_query=True),
                                     dict(multi_query=False)])
def test_falcon_query_key_value_layouts(variant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    alibi=False, bos_token_id=0, eos_token_id=0, **variant)
    prepared, shrunk = prune(transformers.FalconForCausalLM(cfg), 0.5, (torch.randint(0, 100, (2, 8)),))
    layouts = {s.layout for s in channel_plan_of(prepared).channels.attention.values()}
    assert layouts == {"interleaved" if not variant.get("multi_query", True) or "num_kv_heads" in variant
                       else "shared_kv"}
    for layer in shrunk.transformer.h:
        assert layer.self_attention.num_heads == 2
    # The root is recorded on the example: prepare has inlined FalconLinear as ``x @ W.T``, which the
    # recording folds back into the layer, so the MLP units are cut (128 -> 64) as well.
    for layer in shrunk.transformer.h:
        assert layer.mlp.dense_h_to_4h.weight.shape[0] == 64 and layer.mlp.dense_4h_to_h.weight.shape[1] == 64
    assert "dense_h_to_4h.weight" not in str(fxprune.structured.channel_report(prepared))
    _causal_lm(prepared, shrunk, 100)


def test_swin_heads_take_their_relative_position_bias_columns():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                  window_size=4)
    x = torch.randn(2, 3, 32, 32)
    prepared, shrunk = prune(transformers.SwinModel(cfg), 0.5, (x,))
    clean(shrunk)
    heads = [(b.attention.num_attention_heads, b.attention.relative_position_bias.relative_position_bias_table.shape[1])
             for layer in shrunk.encoder.layers for b in layer.blocks]
    assert heads == [(1, 1), (1, 1), (2, 2), (2, 2)]
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x).last_hidden_state, prepared(x).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_a_shared_config_head_count_needs_the_same_heads_in_every_layer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = transformers.Phi3Model(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model, {"magnitude": {"p": {
            "pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot"}}, "start_epoch": 0, "end_epoch": 0},
            example_inputs=(torch.randint(0, 100, (2, 8)),))
    prepared.pruner.on_epoch_begin(0)
    for t in prepared.pruner.targets:  # layer 1 keeps every head, layer 0 loses half
        if t.name.startswith("layers.1.self_attn."):
            t.masked.mask.fill_(True)
    with pytest.raises(fxprune.errors.PruningError, match="shared config.num_attention_heads"):
        fxprune.convert(prepared, physical=True)
