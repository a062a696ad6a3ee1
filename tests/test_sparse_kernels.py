"""Sparse inference modules and the per-layer kernel choice: equal to the dense-masked model, same state_dict
keys, loadable both ways, scriptable, and a clear error when someone trains through them."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.kernels import choose_kernels
from fxprune.sparse_modules import SparseConv2d, SparseLinear


def _prune(t: torch.Tensor, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t[torch.rand(t.shape, generator=g) < sparsity] = 0
    return t


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-5 if a.dtype == torch.float32 else 1e-12
    return torch.allclose(a, b, rtol=tol * 10, atol=tol * max(1.0, float(b.abs().max()) if b.numel() else 1.0))


@settings(max_examples=25, deadline=None)
@given(
    inp=st.integers(1, 24), out=st.integers(1, 24), sparsity=st.floats(0, 1), bias=st.booleans(),
    lead=st.sampled_from([(), (1,), (5,), (2, 3), (0,)]), dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(["csr", "bsr"]), seed=st.integers(0, 2**16),
)
def test_sparse_linear_equals_dense_masked(inp, out, sparsity, bias, lead, dtype, layout, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias).to(dtype)
    _prune(lin.weight, sparsity, seed)
    block = None
    if layout == "bsr":
        block = next((b for b in (4, 2, 1) if inp % b == 0 and out % b == 0))
    sparse = SparseLinear.from_dense(lin, layout, block).eval()
    x = torch.randn(*lead, inp, dtype=dtype)
    with torch.no_grad():
        assert _close(sparse(x), F.linear(x, lin.weight, lin.bias))
    assert sparse(x).shape == (*lead, out)
    # state_dict: the dense module's keys and values, loadable into nn.Linear, and back
    sd = sparse.state_dict()
    assert list(sd) == list(lin.state_dict())
    assert torch.equal(sd["weight"], lin.weight.detach())
    fresh = nn.Linear(inp, out, bias=bias).to(dtype)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, lin.weight)
    other = SparseLinear.from_dense(nn.Linear(inp, out, bias=bias).to(dtype), layout, block).eval()
    other.load_state_dict(lin.state_dict())
    with torch.no_grad():
        assert _close(other(x), F.linear(x, lin.weight, lin.bias))


@settings(max_examples=20, deadline=None)
@given(
    cin=st.integers(1, 6), cout=st.integers(1, 6), k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2),
    padding=st.integers(0, 2), dilation=st.integers(1, 2), size=st.integers(5, 9), batch=st.sampled_from([None, 1, 3]),
    sparsity=st.floats(0, 1), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_sparse_conv_equals_dense_masked(cin, cout, k, stride, padding, dilation, size, batch, sparsity, bias, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    _prune(conv.weight, sparsity, seed)
    sparse = SparseConv2d.from_dense(conv).eval()
    x = torch.randn(cin, size, size) if batch is None else torch.randn(batch, cin, size, size)
    with torch.no_grad():
        ref = conv(x)
        assert _close(sparse(x), ref) and sparse(x).shape == ref.shape
    assert list(sparse.state_dict()) == list(conv.state_dict())
    assert torch.equal(sparse.state_dict()["weight"], conv.weight.detach())


def test_grouped_and_string_padding_convs_are_refused_with_reason():
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    assert "string padding" in SparseConv2d.unsupported(nn.Conv2d(4, 4, 3, padding="same"))


class _Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.shared = nn.Linear(16, 16, bias=False)
        self.unused = nn.Linear(4, 4)
        self.to(dtype)

    def forward(self, x):
        x = torch.relu(self.point(torch.relu(self.conv(x))))
        x = torch.relu(self.fc(x.flatten(1)))
        return self.shared(torch.tanh(self.shared(x)))


def _pruned_net(sparsity=0.9, dtype=torch.float32):
    torch.manual_seed(0)
    net = _Net(dtype).eval()
    for i, p in enumerate(net.parameters()):
        if p.dim() > 1:
            _prune(p, sparsity, i)
    return net


def test_forced_swap_equals_dense_and_round_trips():
    net = _pruned_net()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ref = net(x)
    dense_sd = net.state_dict()
    sparse = fxprune.sparsify_kernels(copy.deepcopy(net), x, force=True)
    kinds = {n: type(m).__name__ for n, m in sparse.named_children()}
    assert kinds == {"conv": "SparseConv2d", "point": "SparseConv2d", "fc": "SparseLinear",
                     "shared": "SparseLinear", "unused": "Linear"}  # not called by the example: stays dense
    with torch.no_grad():
        assert _close(sparse(x), ref)
    # the state_dict is the dense model's, key for key and value for value
    sd = sparse.state_dict()
    assert list(sd) == list(dense_sd) and all(torch.equal(sd[k], dense_sd[k]) for k in sd)
    fresh = _Net().eval()
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    # a dense state_dict loads into the sparse model (strict), and so does a different one
    other = fxprune.sparsify_kernels(_Net().eval(), x, force=True)
    other.load_state_dict(dense_sd, strict=True)
    with torch.no_grad():
        assert _close(other(x), ref)
    # pickling, deepcopy, TorchScript (script and trace), torch.compile
    buf = io.BytesIO()
    torch.save(sparse, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    scripted = torch.jit.script(sparse)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    with torch.no_grad():
        traced = torch.jit.trace(sparse, x)
        for m in (loaded, copy.deepcopy(sparse), scripted, torch.jit.load(buf), traced,
                  torch.compile(sparse, backend="eager")):
            assert _close(m(x), ref)
    assert sparse.double().fc.values.dtype == torch.float64


def test_training_through_a_sparse_module_is_an_error_and_eval_gradients_are_exact():
    net = _pruned_net()
    x = torch.randn(2, 3, 4, 4)
    sparse = fxprune.sparsify_kernels(copy.deepcopy(net), x, force=True)
    sparse.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        sparse(x)
    with torch.no_grad():  # inference in train mode is fine
        sparse(x)
    sparse.eval()
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    sparse(xs).square().sum().backward()
    net(xd).square().sum().backward()
    assert _close(xs.grad, xd.grad)
    assert _close(sparse.fc.bias.grad, net.fc.bias.grad)


def test_choices_keep_dense_with_reasons():
    x = torch.randn(2, 3, 4, 4)
    half = {c.name: c for c in choose_kernels(_pruned_net(0.5), x, repeats=1)}
    assert all(c.chosen == "dense" for c in half.values())
    assert "min_sparsity" in half["fc"].reason and "not called" in half["unused"].reason
    bf16 = {c.name: c for c in choose_kernels(_pruned_net(0.9, torch.bfloat16), x.bfloat16(), force=True)}
    assert all(c.chosen == "dense" for c in bf16.values())
    assert "dtype bfloat16" in bf16["fc"].reason
    measured = {c.name: c for c in choose_kernels(_pruned_net(0.95), x, repeats=2, min_time_s=1e-4)}
    fc = measured["fc"]
    assert fc.dense_s > 0 and fc.candidates_s["csr"] > 0 and fc.input_shape == (2, 128)
    assert fc.output_shape == (2, 16) and fc.chosen in ("dense", "csr")
    assert measured["shared"].reason.endswith("(called 2 times; timed on the first call's input)")


def test_auto_never_changes_outputs_and_never_touches_the_model_it_measures():
    net = _pruned_net(0.95)
    x = torch.randn(1, 3, 4, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    choose_kernels(net, x, repeats=1, min_time_s=1e-4)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.eval()
    with torch.no_grad():
        ref = net(x)
        out = fxprune.sparsify_kernels(copy.deepcopy(net), x, repeats=1, min_time_s=1e-4)(x)
    assert _close(out, ref)


def test_convert_with_kernels_auto():
    net = _pruned_net(0.0)
    x = torch.randn(2, 3, 4, 4)
    cfg = {"pruning": {"magnitude": {"p": {"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.9}}}}
    prepared = fxprune.prepare(net, cfg)
    prepared.pruner.on_epoch_begin(0)
    with pytest.raises(TypeError, match="example_inputs"):
        fxprune.convert(prepared, kernels="auto")
    with pytest.raises(ValueError, match="kernels must be"):
        fxprune.convert(prepared, kernels="fast", example_inputs=x)
    with pytest.raises(TypeError, match="still prepared"):
        fxprune.sparsify_kernels(prepared, x)
    dense = fxprune.convert(prepared).eval()
    auto = fxprune.convert(prepared, kernels="auto", example_inputs=x).eval()
    assert isinstance(auto, _Net)
    with torch.no_grad():
        assert _close(auto(x), dense(x))
    assert list(auto.state_dict()) == list(dense.state_dict())


def test_cold_cache_timing_is_one_call_per_sample_after_eviction():
    from fxprune.kernels import _last_level_cache_bytes, _times

    calls, warm_calls = [], []
    evict = torch.zeros(1024)
    times = _times({"a": lambda: calls.append(float(evict[0])), "b": lambda: warm_calls.append(float(evict[0]))},
                   repeats=3, min_time_s=1e-3, evict=evict, cold=frozenset({"a"}))
    assert calls == [0.0, 0.0, 1.0, 2.0, 3.0]  # two warm-up calls, then one call after each eviction
    assert len(warm_calls) > 2 + 3  # warm: several calls per sample, and no eviction of their own
    assert times["a"][0] >= times["a"][1] > 0
    assert _last_level_cache_bytes() > 0


def test_each_side_is_timed_in_the_cache_state_its_model_would_run_in(monkeypatch):
    # 90% sparse: the dense weights exceed a cache the CSR weights fit in, so dense is timed cold, sparse warm.
    import fxprune.kernels as kernels

    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.9)
    dense_bytes = 2 * 256 * 256 * 4
    for llc, expected in [(dense_bytes // 2, "dense cold, sparse warm"), (dense_bytes * 2, "dense warm, sparse warm"),
                          (dense_bytes // 50, "dense cold, sparse cold")]:
        monkeypatch.setattr(kernels, "_last_level_cache_bytes", lambda llc=llc: llc)
        choices = kernels.choose_kernels(net, torch.randn(1, 256), repeats=1, min_time_s=1e-4)
        assert [c.cache for c in choices] == [expected, expected], llc


def test_sparsity_report_counts_the_weights_of_sparse_modules():
    net = _pruned_net()
    sparse = fxprune.sparsify_kernels(copy.deepcopy(net), torch.randn(2, 3, 4, 4), force=True)
    dense_rows = fxprune.sparsity_report(net).to_dict()
    assert fxprune.sparsity_report(sparse).to_dict() == dense_rows


@pytest.mark.parametrize("layer", ["linear", "conv1x1"])
def test_a_trace_at_batch_1_serves_every_batch(layer):
    # Batch 1 takes a sparse matrix-vector product in eager mode; a trace must not keep that branch.
    torch.manual_seed(0)
    dense = (nn.Linear(16, 8) if layer == "linear" else nn.Conv2d(16, 8, 1)).eval()
    _prune(dense.weight, 0.8, 0)
    sparse = (SparseLinear if layer == "linear" else SparseConv2d).from_dense(dense).eval()
    shape = (16,) if layer == "linear" else (16, 3, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python ints
        traced = torch.jit.trace(sparse, torch.randn(1, *shape))
        for batch in (1, 5):
            x = torch.randn(batch, *shape)
            assert _close(traced(x), dense(x)), batch
