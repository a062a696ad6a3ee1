"""fxprune.observe: every way of reading a weight reports input rows such that rows() @ matrix(p).T is the op's output.

The oracle is the op itself: for each read kind the test runs the op under the
observer and rebuilds its output (minus bias) from the reported rows and the
reported matrix view of the parameter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from fxprune import PruningError
from fxprune.observe import WeightInputObserver, WeightRead

SETTINGS = settings(max_examples=25, deadline=None)
dims = st.integers(1, 6)


def _observe(weights: dict[str, torch.Tensor], fn) -> tuple[object, list[WeightRead]]:
    reads: list[WeightRead] = []
    with WeightInputObserver(nn.Module(), weights, reads.append):
        out = fn()
    return out, reads


def _rebuilt(read: WeightRead, param: torch.Tensor) -> torch.Tensor:
    return read.rows() @ read.matrix(param).T


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- dense read kinds
@SETTINGS
@given(out=dims, inp=dims, batch=st.lists(dims, min_size=0, max_size=3), seed=st.integers(0, 999),
       kind=st.sampled_from(["linear", "x@W.T", "addmm[in,out]", "W@x", "matmul-batched", "mm", "linear-1d"]))
def test_matmul_like_reads_rebuild_the_output(out, inp, batch, seed, kind):
    g = _gen(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    w_io = torch.randn(inp, out, generator=g, dtype=torch.float64)  # Conv1D layout [in, out]
    b = torch.randn(out, generator=g, dtype=torch.float64)
    x = torch.randn(*batch, 3, inp, generator=g, dtype=torch.float64)
    param = w_io if kind == "addmm[in,out]" else w
    if kind == "linear":
        fn = lambda: F.linear(x, w, b) - b  # noqa: E731
        expected = lambda y: y.reshape(-1, out)  # noqa: E731
    elif kind == "x@W.T":
        fn, expected = (lambda: x @ w.T), (lambda y: y.reshape(-1, out))
    elif kind == "addmm[in,out]":
        fn = lambda: torch.addmm(b, x.reshape(-1, inp), w_io) - b  # noqa: E731
        expected = lambda y: y  # noqa: E731
    elif kind == "W@x":
        fn = lambda: w @ x.transpose(-2, -1)  # noqa: E731
        expected = lambda y: y.transpose(-2, -1).reshape(-1, out)  # noqa: E731
    elif kind == "matmul-batched":
        fn, expected = (lambda: torch.matmul(x, w.t())), (lambda y: y.reshape(-1, out))
    elif kind == "mm":
        fn, expected = (lambda: torch.mm(x.reshape(-1, inp), w.t())), (lambda y: y)
    else:  # a single vector
        v = x.reshape(-1)[:inp]
        fn, expected = (lambda: F.linear(v, w)), (lambda y: y.reshape(1, out))
    y, reads = _observe({"w": param}, fn)
    assert len(reads) == 1
    (read,) = reads
    assert read.name == "w" and read.expert is None and read.kind == "matmul"
    assert read.n_rows == read.rows().shape[0] == expected(y).shape[0]
    torch.testing.assert_close(_rebuilt(read, param), expected(y))
    torch.testing.assert_close(read.feature_sq_sums(), read.rows().pow(2).sum(0))


@SETTINGS
@given(spatial=st.integers(1, 3), cin=st.integers(1, 3), cout=st.integers(1, 4), k=st.integers(1, 3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), padding=st.sampled_from([0, 1, "same", "valid"]),
       module=st.booleans(), seed=st.integers(0, 999))
def test_conv_reads_rebuild_the_output(spatial, cin, cout, k, stride, dilation, padding, module, seed):
    if padding == "same":
        stride = 1
    g = _gen(seed)
    size = [7, 6, 5][:spatial]
    x = torch.randn(2, cin, *size, generator=g, dtype=torch.float64)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][spatial - 1](cin, cout, k, stride=stride, padding=padding,
                                                          dilation=dilation).double()
    w = conv.weight
    if module:
        fn = lambda: conv(x) - conv.bias.view(1, -1, *[1] * spatial)  # noqa: E731
    else:
        f = [F.conv1d, F.conv2d, F.conv3d][spatial - 1]
        fn = lambda: f(x, w, None, stride, padding, dilation)  # noqa: E731
    with torch.no_grad():
        y, reads = _observe({"w": w}, fn)
    (read,) = reads
    assert read.kind == "conv" and read.n_rows == read.rows().shape[0]
    torch.testing.assert_close(_rebuilt(read, w.detach()), y.movedim(1, -1).reshape(-1, cout))
    torch.testing.assert_close(read.feature_sq_sums(), x.pow(2).sum(dim=[0, *range(2, 2 + spatial)]))


def test_grouped_conv_gives_channel_norms_and_refuses_rows():
    w = torch.randn(6, 2, 3)
    x = torch.randn(2, 4, 8)
    _, (read,) = _observe({"w": w}, lambda: F.conv1d(x, w, groups=2))
    torch.testing.assert_close(read.feature_sq_sums(), x.double().pow(2).sum(dim=(0, 2)))
    with pytest.raises(PruningError, match=r"'w'.*grouped convolution"):
        read.rows()


def test_mamba_style_depthwise_kernel_view_is_the_weight():
    w = torch.randn(4, 1, 3)  # nn.Conv1d(4, 4, 3, groups=4).weight
    x = torch.randn(2, 4, 6)
    y, (read,) = _observe({"w": w}, lambda: F.conv1d(x, w.squeeze(1).unsqueeze(1), padding=2, groups=4))
    assert read.kind == "conv" and read.n_rows == 2 * 8


# ----------------------------------------------------------------------------- stacked experts
def _routing(g: torch.Generator, tokens: int, experts: int, top_k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])  # [tokens, top_k]


@SETTINGS
@given(experts=st.integers(1, 4), out=dims, inp=dims, tokens=st.integers(1, 9), seed=st.integers(0, 999),
       transposed=st.booleans(),
       form=st.sampled_from(["loop-linear", "loop-matmul", "batched-bmm", "batched-matmul", "grouped"]))
def test_expert_reads_are_exactly_the_routed_tokens(experts, out, inp, tokens, seed, transposed, form):
    g = _gen(seed)
    top_k = min(2, experts)
    # [E, out, in] as Mixtral keeps gate_up_proj / down_proj; [E, in, out] for "is_transposed" models.
    shape = (experts, inp, out) if transposed else (experts, out, inp)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    route = _routing(g, tokens, experts, top_k)

    def mat(e):  # the [out, in] matrix of expert e, as the model multiplies it
        return w[e].T if transposed else w[e]

    def run():
        outs = {}
        if form.startswith("loop"):
            for e in range(experts):
                tok = (route == e).any(1).nonzero().reshape(-1)
                if tok.numel() == 0:
                    continue
                xe = x[tok]
                outs[e] = F.linear(xe, mat(e)) if form == "loop-linear" else xe @ mat(e).T
        elif form.startswith("batched"):
            ids = route.reshape(-1)
            xs = x.repeat_interleave(top_k, dim=0)
            sel = w[ids]
            if form == "batched-bmm":
                y = (torch.bmm(xs.unsqueeze(1), sel).squeeze(1) if transposed
                     else torch.bmm(sel, xs.unsqueeze(-1)).squeeze(-1))
            else:
                y = (torch.matmul(xs.unsqueeze(1), sel).squeeze(1) if transposed
                     else torch.matmul(sel, xs.unsqueeze(-1)).squeeze(-1))
            for e in ids.unique().tolist():
                outs[e] = y[ids == e]
        else:  # grouped mm, rows sorted by expert, weight [E, in, out]
            ids, perm = torch.sort(route.reshape(-1), stable=True)
            xs = x[perm // top_k]
            offs = torch.cumsum(torch.bincount(ids, minlength=experts), 0).to(torch.int32)
            weight = w if transposed else w.transpose(-2, -1)
            y = torch.ops.transformers.grouped_mm_fallback(xs, weight, offs=offs) if _HAS_FALLBACK else \
                _grouped_reference(xs, weight, offs)
            for e in ids.unique().tolist():
                outs[e] = y[ids == e]
        return outs

    if form == "grouped" and not _HAS_FALLBACK:
        pytest.skip("transformers' grouped_mm fallback op is not installed")
    outs, reads = _observe({"experts": w}, run)
    by_expert: dict[int, list[WeightRead]] = {}
    for r in reads:
        by_expert.setdefault(r.expert, []).append(r)
    routed = {e: (route == e).any(1).nonzero().reshape(-1) for e in range(experts)}
    assert set(by_expert) == {e for e, tok in routed.items() if tok.numel()}
    for e, rs in by_expert.items():
        rows = torch.cat([r.rows() for r in rs])
        # exactly the routed tokens (each once per routing slot)
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x[routed[e]].tolist()))
        assert sum(r.n_rows for r in rs) == routed[e].numel()
        for r in rs:
            m = r.matrix(w)
            assert m.shape == (out, inp) and m.data_ptr() == mat(e).data_ptr()  # a view of the parameter
        torch.testing.assert_close(torch.cat([_rebuilt(r, w) for r in rs]), outs[e])


def _grouped_reference(x, w, offs):
    start, outs = 0, []
    for g, end in enumerate(offs.tolist()):
        outs.append(x[start:end] @ w[g])
        start = end
    return torch.cat(outs)


try:
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
    _HAS_FALLBACK = hasattr(torch.ops.transformers, "grouped_mm_fallback")
except Exception:  # pragma: no cover - transformers is an optional dependency
    _HAS_FALLBACK = False


def test_torch_grouped_mm_per_expert():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not available in this torch build")
    g = _gen(0)
    w = torch.randn(3, 8, 4, generator=g)  # [E, in, out], 16-byte aligned rows for the CPU kernel
    x = torch.randn(10, 8, generator=g)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    y, reads = _observe({"w": w}, lambda: torch._grouped_mm(x, w, offs=offs))
    assert [(r.expert, r.n_rows) for r in reads] == [(0, 3), (2, 7)]
    torch.testing.assert_close(torch.cat([_rebuilt(r, w) for r in reads]), torch.cat([y[:3], y[3:]]))


def test_matrix_writes_the_parameter():
    w = torch.randn(2, 3, 4)
    _, (read,) = _observe({"w": w}, lambda: F.linear(torch.randn(5, 4), w[1]))
    read.matrix(w).zero_()
    assert bool((w[1] == 0).all()) and bool((w[0] != 0).any())


def test_copies_and_casts_are_followed():
    w = torch.randn(6, 4)
    x = torch.randn(5, 4, dtype=torch.float64)
    y, (read,) = _observe({"w": w}, lambda: F.linear(x, w.t().contiguous().t().to(torch.float64)))
    torch.testing.assert_close(_rebuilt(read, w.double()), y)


# ----------------------------------------------------------------------------- not reads / not attributable
def test_metadata_is_not_a_read_and_unused_weights_count_zero():
    w, v = torch.randn(3, 4), torch.randn(2, 2)
    with WeightInputObserver(nn.Module(), {"w": w, "v": v}, lambda r: pytest.fail("no read expected")) as obs:
        _ = (w.shape, w.size(), w.dtype, w.device, w.dim(), w.numel(), w.is_contiguous(), torch.zeros_like(w),
             torch.randn(3, 4).view_as(w))
    assert obs.rows_seen == {"w": 0, "v": 0}


@pytest.mark.parametrize("fn,op", [
    (lambda w: F.embedding(torch.tensor([0, 2]), w), "embedding"),
    (lambda w: F.linear(torch.randn(2, 4), w * 2), "mul"),
    (lambda w: F.linear(w, torch.randn(5, 4)), "linear"),
    (lambda w: F.linear(torch.randn(2, 2), w[:, :2]), "linear"),
    (lambda w: torch.randn(2, 4) @ w.reshape(4, 3), "matmul"),
], ids=["embedding", "elementwise", "as-input", "slice", "merged-view"])
def test_reads_that_cannot_be_attributed_name_the_weight_and_op(fn, op):
    w = torch.randn(3, 4)
    with pytest.raises(PruningError, match=rf"weight 'w' is read by '{op}'"):
        _observe({"w": w}, lambda: fn(w))


def test_nothing_stays_behind_after_exit_even_on_errors():
    model = nn.Linear(4, 3)
    before = (dict(model.__dict__), torch._C._len_torch_function_stack())
    with pytest.raises(ZeroDivisionError):
        with WeightInputObserver(model, {"weight": model.weight}, lambda r: None):
            model(torch.randn(2, 4))
            1 / 0
    with pytest.raises(PruningError):
        with WeightInputObserver(model, {"weight": model.weight}, lambda r: None):
            F.embedding(torch.tensor([0]), model.weight)
    assert (dict(model.__dict__), torch._C._len_torch_function_stack()) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    reads = []
    model(torch.randn(2, 4))  # no observer any more
    assert reads == []


def test_tied_and_shared_weights_report_every_read():
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        _, reads = _observe({"w": lin.weight}, lambda: lin(lin(torch.randn(3, 4))))
    assert [r.n_rows for r in reads] == [3, 3]


def test_watched_effective_tensors_and_their_lifetime():
    w = torch.randn(3, 4)
    reads = []
    with WeightInputObserver(nn.Module(), {}, reads.append) as obs:
        eff = w * 1.0
        obs.watch("w", eff)
        F.linear(torch.randn(2, 4), eff.T.T)
        del eff
        F.linear(torch.randn(2, 4), w * 1.0)  # a fresh tensor at possibly the same address: not watched
    assert [r.name for r in reads] == ["w"] and obs.rows_seen == {"w": 2}
