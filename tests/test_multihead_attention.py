"""nn.MultiheadAttention heads as channels: the replacement module, masked == shrunk, torchvision ViT."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.masked import MaskedParameter
from fxprune.structured import channel_report
from fxprune.structured.multihead import PrunedMultiheadAttention


def config(goal: float) -> dict:
    return {"magnitude": {"p": {"pattern": "channel", "target_sparsity": goal, "schedule": "oneshot"}},
            "start_epoch": 0, "end_epoch": 0}


def prune(model: nn.Module, goal: float, example: tuple):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), config(goal), example_inputs=example)
    prepared.pruner.on_epoch_begin(0)
    return prepared.eval(), fxprune.convert(prepared, physical=True).eval()


def no_fxprune_leftovers(model: nn.Module) -> None:
    for m in model.modules():
        assert not isinstance(m, MaskedParameter)
        assert not m._forward_hooks and not m._forward_pre_hooks


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 4), batch_first=st.booleans(), bias=st.booleans(),
       bias_kv=st.booleans(), zero_attn=st.booleans(), batched=st.booleans(), need_weights=st.booleans(),
       average=st.booleans(), mask=st.sampled_from(["none", "bool", "float", "per_head", "causal"]),
       padding=st.booleans(), seed=st.integers(0, 2**16))
def test_the_replacement_with_every_head_kept_is_nn_multihead_attention(
        heads, head_dim, batch_first, bias, bias_kv, zero_attn, batched, need_weights, average, mask, padding, seed):
    """Oracle: torch's own module. Same parameters, every head kept, every call option."""
    torch.manual_seed(seed)
    e, n, t = heads * head_dim, 2, 5
    mha = nn.MultiheadAttention(e, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                batch_first=batch_first).eval()
    if bias:
        nn.init.normal_(mha.in_proj_bias)
    ours = PrunedMultiheadAttention(mha, list(range(heads)), heads).eval()
    shape = ((n, t, e) if batch_first else (t, n, e)) if batched else (t, e)
    q, kv = torch.randn(shape), torch.randn(shape)
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(t, t) > 0.7
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(t, t)
    elif mask == "per_head":
        kwargs["attn_mask"] = torch.randn(n * heads if batched else heads, t, t)
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(t)
        kwargs["is_causal"] = True
    if padding and mask not in ("bool",):  # torch wants both masks of one kind
        pad = torch.zeros(n, t) if batched else torch.zeros(t)
        pad[..., -1] = float("-inf")
        kwargs["key_padding_mask"] = pad
    with torch.no_grad():
        want = mha(q, kv, kv, **kwargs)
        got = ours(q, kv, kv, **kwargs)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    else:
        assert got[1] is None and want[1] is None


class AttentionStack(nn.Module):
    """``layers`` of nn.MultiheadAttention with residuals; optionally returns the last one's weights."""

    def __init__(self, embed: int, heads: int, layers: int, batch_first: bool, bias: bool, bias_kv: bool,
                 return_weights: bool):
        super().__init__()
        self.inp = nn.Linear(6, embed)
        self.attn = nn.ModuleList(nn.MultiheadAttention(embed, heads, bias=bias, add_bias_kv=bias_kv,
                                                        batch_first=batch_first) for _ in range(layers))
        self.out = nn.Linear(embed, 3)
        self.return_weights = return_weights

    def forward(self, x, mask=None):
        h = self.inp(x)
        w = None
        for a in self.attn:
            o, w = a(h, h, h, attn_mask=mask, need_weights=self.return_weights, average_attn_weights=False)
            h = torch.relu(h + o)
        return (self.out(h), w) if self.return_weights else self.out(h)


@settings(max_examples=10, deadline=None)
@given(heads=st.integers(2, 5), head_dim=st.integers(1, 4), layers=st.integers(1, 2), batch_first=st.booleans(),
       bias=st.booleans(), bias_kv=st.booleans(), goal=st.floats(0.2, 0.9), seed=st.integers(0, 2**16))
def test_multihead_attention_loses_whole_heads_and_shrunk_equals_masked(
        heads, head_dim, layers, batch_first, bias, bias_kv, goal, seed):
    torch.manual_seed(seed)
    e = heads * head_dim
    model = AttentionStack(e, heads, layers, batch_first, bias, bias_kv, return_weights=False)
    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    prepared, shrunk = prune(model, goal, (x,))
    removed = min(int(goal * heads + 0.5), heads - 1)
    no_fxprune_leftovers(shrunk)
    for i, a in enumerate(shrunk.attn):
        if removed:
            assert isinstance(a, PrunedMultiheadAttention) and a.num_heads == heads - removed
        # the stream (no norm here) may lose channels too: rows are heads, columns the stream
        assert a.in_proj_weight.shape[0] == 3 * (heads - removed) * head_dim
        assert a.out_proj.weight.shape[1] == (heads - removed) * head_dim
        rows = prepared.pruner.targets  # whole heads: each head's q, k, v rows are kept or pruned together
        mask = next(t.masked.mask for t in rows if t.name == f"attn.{i}.in_proj_weight")
        kept = mask.reshape(3, heads, -1).any(-1)
        assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])
        assert int((~kept[0]).sum()) == removed
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    for inp, m in ((x, None), (torch.randn(7, 3, 6) if not batch_first else torch.randn(3, 7, 6), causal)):
        with torch.no_grad():
            torch.testing.assert_close(shrunk(inp, m), prepared(inp, m), atol=1e-5, rtol=1e-4)


def test_read_attention_weights_keep_their_heads():
    torch.manual_seed(0)
    model = AttentionStack(8, 4, 1, True, True, False, return_weights=True)
    x = torch.randn(2, 5, 6)
    prepared, shrunk = prune(model, 0.5, (x,))
    report = channel_report(prepared)["p"]
    assert any("attention weights" in r for _, _, _, reasons in report.excluded for r in reasons)
    assert shrunk.attn[0].num_heads == 4  # the stream may shrink, the heads stay
    with torch.no_grad():
        out, w = shrunk(x)
        assert w.shape == (2, 4, 5, 5)
        torch.testing.assert_close(out, prepared(x)[0], atol=1e-5, rtol=1e-4)


def test_need_weights_of_the_replacement_has_the_kept_heads():
    torch.manual_seed(0)

    class Unread(AttentionStack):  # asks for the weights, reads only the output
        def forward(self, x):
            h = self.inp(x)
            o, _ = self.attn[0](h, h, h)
            return self.out(h + o)

    model = Unread(8, 4, 1, True, True, False, return_weights=False)
    x = torch.randn(2, 5, 6)
    prepared, shrunk = prune(model, 0.5, (x,))
    a = shrunk.attn[0]
    assert isinstance(a, PrunedMultiheadAttention) and a.num_heads == 2
    h = torch.randn(2, 5, a.embed_dim)  # the stream may have lost channels too
    out, w = a(h, h, h, need_weights=True, average_attn_weights=False)
    assert out.shape == (2, 5, a.out_proj.out_features) and w.shape == (2, 2, 5, 5)
    per_head = torch.randn(2 * 4, 5, 5)  # masks keep the original head count
    assert a(h, h, h, attn_mask=per_head)[1].shape == (2, 5, 5)
    with pytest.raises(RuntimeError, match="4 heads the module had"):
        a(h, h, h, attn_mask=torch.randn(2 * 2, 5, 5))


@settings(max_examples=6, deadline=None)
@given(heads=st.sampled_from([2, 4]), norm_first=st.booleans(), batch_first=st.booleans(), goal=st.floats(0.3, 0.8),
       seed=st.integers(0, 2**16))
def test_transformer_encoder_layers_lose_heads_and_mlp_units(heads, norm_first, batch_first, goal, seed):
    torch.manual_seed(seed)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, heads, 32, dropout=0.0, norm_first=norm_first,
                                                                   batch_first=batch_first) for _ in range(2))
            self.out = nn.Linear(16, 3)

        def forward(self, x, mask=None):
            h = self.inp(x)
            for layer in self.layers:
                h = layer(h, src_mask=mask)
            return self.out(h)

    x = torch.randn(2, 5, 6) if batch_first else torch.randn(5, 2, 6)
    prepared, shrunk = prune(Encoder(), goal, (x,))
    removed = min(int(goal * heads + 0.5), heads - 1)
    for layer in shrunk.layers:
        assert layer.self_attn.num_heads == heads - removed
        assert layer.linear1.out_features == 32 - int(goal * 32 + 0.5)
    no_fxprune_leftovers(shrunk)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    for m in (None, mask):
        with torch.no_grad():  # eval + no_grad: the dense layer would take its fused fast path
            torch.testing.assert_close(shrunk(x, m), prepared(x, m), atol=1e-5, rtol=1e-4)


def test_torchvision_vit_loses_half_its_heads():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64,
                                        mlp_dim=128)
    x = torch.randn(2, 3, 32, 32)
    prepared, shrunk = prune(model, 0.5, (x,))
    report = channel_report(prepared)["p"]
    assert len(report.head_groups) == 2
    for layer in shrunk.encoder.layers:
        assert isinstance(layer.self_attention, PrunedMultiheadAttention) and layer.self_attention.num_heads == 2
        assert layer.self_attention.out_proj.in_features == 32 and layer.mlp[0].out_features == 64
    no_fxprune_leftovers(shrunk)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shrunk(x[:1]), prepared(x[:1]), atol=1e-5, rtol=1e-4)


def test_transformer_decoder_layer_self_and_cross_attention_lose_heads():
    torch.manual_seed(0)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mem = nn.Linear(6, 16), nn.Linear(6, 16)
            self.layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x, m):
            return self.out(self.layer(self.inp(x), self.mem(m)))

    x, m = torch.randn(2, 5, 6), torch.randn(2, 7, 6)
    prepared, shrunk = prune(Decoder(), 0.5, (x, m))
    assert shrunk.layer.self_attn.num_heads == 2 and shrunk.layer.multihead_attn.num_heads == 2
    report = channel_report(prepared)["p"]
    assert any("reads key/value from another activation" in r for _, _, _, rs in report.excluded for r in rs)
    no_fxprune_leftovers(shrunk)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x, m), prepared(x, m), atol=1e-5, rtol=1e-4)


@settings(max_examples=4, deadline=None)
@given(norm_first=st.booleans(), batch_first=st.booleans(), seed=st.integers(0, 2**16))
def test_encoder_layer_on_the_model_input_stream_keeps_the_stream(norm_first, batch_first, seed):
    # The stream is the model's input, so it cannot be cut; the residual adds inside the layer must block it even
    # after a LayerNorm of the untracked input (which once let linear2's channels through to the head alone).
    torch.manual_seed(seed)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first,
                                                  batch_first=batch_first)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.enc(x))

    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    prepared, shrunk = prune(Model(), 0.5, (x,))
    assert shrunk.head.in_features == 16 and shrunk.enc.linear2.out_features == 16
    assert shrunk.enc.self_attn.num_heads == 2 and shrunk.enc.linear1.out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x), atol=1e-5, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(nested=st.booleans(), final_norm=st.booleans(), norm_first=st.booleans(), padded=st.booleans(),
       seed=st.integers(0, 2**16))
def test_transformer_encoder_container_loses_heads_mlp_units_and_stream(nested, final_norm, norm_first, padded, seed):
    # nn.TransformerEncoder's forward (mask canonicalisation, nested tensors) is not traceable; the analysis traces
    # its loop instead, so its layers lose heads, MLP units and the residual stream like hand-stacked ones.
    torch.manual_seed(seed)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if final_norm else None,
                                             enable_nested_tensor=nested and not norm_first)
            self.head = nn.Linear(16, 3)

        def forward(self, x, pad=None):
            return self.head(self.enc(self.inp(x), src_key_padding_mask=pad))

    x = torch.randn(3, 5, 6)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]]) if padded else None
    prepared, shrunk = prune(Model(), 0.5, (x, pad))
    for layer in shrunk.enc.layers:
        assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 16
        assert layer.linear1.in_features == 8 and layer.linear2.out_features == 8  # the stream is cut too
    assert shrunk.head.in_features == 8
    no_fxprune_leftovers(shrunk)
    with torch.no_grad():  # eval + no_grad: the container may pack a padded batch into a nested tensor
        out, want = shrunk(x, pad), prepared(x, pad)
        if pad is not None:  # a nested run leaves padded positions 0; compare the real tokens
            out, want = out[~pad], want[~pad]
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_nn_transformer_encoder_decoder_lose_heads():
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.src, self.tgt = nn.Linear(6, 16), nn.Linear(6, 16)
            self.t = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, s, t):
            mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1])
            return self.out(self.t(self.src(s), self.tgt(t), tgt_mask=mask))

    s, t = torch.randn(2, 7, 6), torch.randn(2, 5, 6)
    prepared, shrunk = prune(Model(), 0.5, (s, t))
    assert shrunk.t.encoder.layers[0].self_attn.num_heads == 2
    assert shrunk.t.decoder.layers[0].self_attn.num_heads == 2
    assert shrunk.t.decoder.layers[0].linear1.out_features == 16
    no_fxprune_leftovers(shrunk)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(s, t), prepared(s, t), atol=1e-5, rtol=1e-4)
