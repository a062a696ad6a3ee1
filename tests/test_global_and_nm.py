"""scope: global (exact radix-select threshold with per-layer bounds) and pattern: N:M.

The global selection is compared with a brute-force oracle that sorts every
entry by (already pruned first, score, tensor, index) and walks the order
until the clamped per-tensor counts reach the goal.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune import ConfigError, PruningError
from fxprune import masks as M
from fxprune.masks import count_to_prune, global_unstructured_masks, layer_bounds, nm_mask


def oracle(scores, masks, sparsity, lo_s=None, hi_s=None):
    numels = [m.numel() for m in masks]
    already = [int((~m).sum()) for m in masks]
    k = count_to_prune(sparsity, sum(numels))
    if k <= sum(already):
        return [m.clone() for m in masks]
    lo, hi, k = layer_bounds(numels, already, k, sparsity, lo_s, hi_s)
    entries = []
    for t, (s, m) in enumerate(zip(scores, masks)):
        vals = torch.nan_to_num(s.double().reshape(-1), nan=math.inf).tolist()
        for j, (v, keep) in enumerate(zip(vals, m.reshape(-1).tolist())):
            entries.append((int(keep), (v + 0.0) if keep else 0.0, t, j))
    entries.sort()
    count = [0] * len(masks)
    clamp = lambda: [min(max(c, a), b) for c, a, b in zip(count, lo, hi)]  # noqa: E731
    p = 0
    while sum(clamp()) < k:
        count[entries[p][2]] += 1
        p += 1
    final = clamp()
    out = []
    for t, m in enumerate(masks):
        keep = torch.ones(m.numel(), dtype=torch.bool)
        for e in [e for e in entries if e[2] == t][: final[t]]:
            keep[e[3]] = False
        out.append(keep.reshape(m.shape))
    return out


@st.composite
def problems(draw):
    n_t = draw(st.integers(1, 4))
    shapes = [(draw(st.integers(1, 6)), draw(st.integers(1, 7))) for _ in range(n_t)]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "ties", "signed-zero", "nan", "double"]))
    scores = []
    for s in shapes:
        if kind == "ties":
            x = torch.randint(-2, 3, s, generator=g).float()
        elif kind == "signed-zero":
            x = torch.randint(-1, 2, s, generator=g).float() * 0.0  # -0.0, 0.0
        else:
            x = torch.randn(s, generator=g, dtype=torch.float64 if kind == "double" else torch.float32)
        if kind == "nan":
            x.view(-1)[0] = float("nan")
            x.view(-1)[-1] = -float("inf")
        scores.append(x)
    p_pruned = draw(st.sampled_from([0.0, 0.2, 0.5]))
    masks = [torch.rand(s, generator=g) >= p_pruned for s in shapes]
    sparsity = draw(st.floats(0.0, 0.99))
    lo = draw(st.one_of(st.none(), st.floats(0.0, 1.0).map(lambda f: f * sparsity)))
    hi = draw(st.one_of(st.none(), st.floats(0.0, 1.0).map(lambda f: sparsity + f * (1 - sparsity))))
    return scores, masks, sparsity, lo, hi


@settings(max_examples=120, deadline=None)
@given(problem=problems(), cap=st.sampled_from([0, 1, 5, 1 << 21]), chunk=st.sampled_from([3, 1 << 18]))
def test_global_equals_bruteforce_oracle(problem, cap, chunk):
    scores, masks, sparsity, lo, hi = problem
    old = M._GATHER_CAP, M._CHUNK
    M._GATHER_CAP, M._CHUNK = cap, chunk  # small caps and chunks exercise the refine levels and tie paths
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = global_unstructured_masks(scores, masks, sparsity, min_sparsity=lo, max_sparsity=hi)
            want = oracle(scores, masks, sparsity, lo, hi)
    finally:
        M._GATHER_CAP, M._CHUNK = old
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@settings(max_examples=100, deadline=None)
@given(problem=problems())
def test_global_exact_count_monotone_and_bounded(problem):
    scores, masks, sparsity, lo, hi = problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = global_unstructured_masks(scores, masks, sparsity, min_sparsity=lo, max_sparsity=hi)
    numels = [m.numel() for m in masks]
    already = [int((~m).sum()) for m in masks]
    pruned = [int((~m).sum()) for m in got]
    k = count_to_prune(sparsity, sum(numels))
    assert all(not (g & ~m).any() for g, m in zip(got, masks))  # monotone: pruned stays pruned
    if sum(already) >= k:
        assert pruned == already
        return
    if not caught:  # no warning: the goal is met exactly
        assert sum(pruned) == k
    for n, a, c in zip(numels, already, pruned):
        lo_n = 0 if lo is None else min(lo, sparsity) * n
        hi_n = n if hi is None else hi * n
        assert c >= min(a, n) and c >= math.floor(lo_n - 1e-9) or c == a
        assert c <= max(a, math.ceil(hi_n + 1e-9))


def test_global_threshold_is_one_threshold():
    """Without bounds, every pruned score is <= every kept score across tensors."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(50, 30, generator=g).abs() * s for s in (1.0, 0.1, 3.0)]
    masks = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    got = global_unstructured_masks(scores, masks, 0.7)
    assert sum(int((~m).sum()) for m in got) == count_to_prune(0.7, 4500)
    assert max(float(s[~m].max()) for s, m in zip(scores, got) if (~m).any()) <= min(
        float(s[m].min()) for s, m in zip(scores, got) if m.any()
    )
    assert int((~got[1]).sum()) >= int((~got[0]).sum()) > int((~got[2]).sum())  # small scores pruned most


def test_min_sparsity_conflict_with_already_pruned_warns_and_overshoots_minimally():
    scores = [torch.arange(10.0), torch.arange(10.0)]
    masks = [torch.zeros(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)]  # first fully pruned
    with pytest.warns(UserWarning, match="min_sparsity"):
        got = global_unstructured_masks(scores, masks, 0.6, min_sparsity=0.5)  # goal 12, floor needs 10 + 5
    assert int((~got[1]).sum()) == 5 and not got[0].any()


# --------------------------------------------------------------------------- N:M


@settings(max_examples=200, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (2, 8)]),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    conv=st.booleans(),
    p_pruned=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_nm_pattern(nm, rows, groups, conv, p_pruned, seed, ties):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    shape = (rows, groups * m, 2, 3) if conv else (rows, groups * m)
    w = torch.randint(-2, 3, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
    old = torch.rand(shape, generator=g) >= p_pruned
    new = nm_mask(w.abs(), old, n, m, 1 - n / m)
    # groups of m consecutive weights along the input dimension (dim 1), per (out, kernel position)
    gw = (w.abs().movedim(1, -1) if conv else w.abs()).reshape(-1, m)
    gk = (new.movedim(1, -1) if conv else new).reshape(-1, m)
    go = (old.movedim(1, -1) if conv else old).reshape(-1, m)
    assert not (gk & ~go).any()  # monotone
    assert bool(((~gk).sum(1) >= m - n).all())  # at least m - n zeros in every group
    for row_w, row_k, row_o in zip(gw, gk, go):
        if int((~row_o).sum()) <= m - n:  # groups not over-pruned before keep exactly n
            assert int(row_k.sum()) == min(n, int(row_o.sum()))
        if row_k.any() and (~row_k & row_o).any():  # kept entries are the largest of the group's candidates
            assert float(row_w[row_k].min()) >= float(row_w[~row_k & row_o].max())


@settings(max_examples=100, deadline=None)
@given(goal=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_nm_ramp_is_exact_and_never_exceeds_pattern(goal, seed):
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w.abs(), torch.ones_like(w, dtype=torch.bool), 2, 4, goal)
    assert int((~mask).sum()) == count_to_prune(goal, w.numel())
    assert bool(((~mask).reshape(-1, 4).sum(1) <= 2).all())
    final = nm_mask(w.abs(), mask, 2, 4, 0.5)  # the last step completes the pattern, keeping earlier choices
    assert not (final & ~mask).any() and bool(((~final).reshape(-1, 4).sum(1) == 2).all())


def test_nm_indivisible_input_dim_names_parameter():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {"pruning": {"magnitude": {"p": {"pattern": "2:4"}}}}
    with pytest.raises((ConfigError, PruningError), match=r"0\.weight.*divisible by 4"):
        prepared = fxprune.prepare(model, cfg)
        prepared.pruner.on_epoch_begin(10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nm_and_global_through_prepare():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = {
        "pruning": {
            "magnitude": {
                "nm": {"weights": ["0.weight", "2.weight"], "pattern": "2:4"},
                "glob": {"weights": ["4.weight"], "scope": "global", "target_sparsity": 0.75},
            },
            "start_epoch": 0,
            "end_epoch": 2,
            "frequency": 1,
        }
    }
    prepared = fxprune.prepare(model, cfg)
    for e in range(3):
        prepared.pruner.on_epoch_begin(e)
    out = fxprune.convert(prepared)
    for w in (out[0].weight, out[2].weight):
        assert bool(((w.reshape(-1, 4) == 0).sum(1) == 2).all())
    assert int((out[4].weight == 0).sum()) == 24


def test_semi_structured_needs_cuda_or_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    prepared = fxprune.prepare(model, {"pruning": {"magnitude": {"p": {"pattern": "2:4"}}, "end_epoch": 0}})
    prepared.pruner.on_epoch_begin(0)
    if not torch.cuda.is_available():
        with pytest.raises(PruningError, match="CUDA"):
            fxprune.convert(prepared, semi_structured=True)
        return
    prepared = prepared.cuda().half()
    dense = fxprune.convert(prepared)
    sparse = fxprune.convert(prepared, semi_structured=True)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "section, path, text",
    [
        ({"magnitude": {"p": {"scope": "globl"}}}, "pruning.magnitude.p.scope", "did you mean 'global'"),
        ({"magnitude": {"p": {"pattern": "chanel"}}}, "pruning.magnitude.p.pattern", "did you mean 'channel'"),
        ({"magnitude": {"p": {"pattern": 124}}}, "pruning.magnitude.p.pattern", "quote it: pattern: '2:4'"),
        ({"magnitude": {"p": {"pattern": "4:4"}}}, "pruning.magnitude.p.pattern", "0 < N < M"),
        ({"magnitude": {"p": {"pattern": "1:4"}}, "target_sparsity": 0.9}, "pruning.magnitude.p.target_sparsity",
         "fixes this pruner's sparsity at 0.75"),
        ({"magnitude": {"p": {"pattern": "2:4", "scope": "global"}}}, "pruning.magnitude.p.scope", "scope: local"),
        ({"magnitude": {"p": {"min_sparsity": 0.1}}}, "pruning.magnitude.p.min_sparsity", "scope: global"),
        ({"magnitude": {"p": {"scope": "global", "max_sparsity": 0.4}}}, "pruning.magnitude.p.max_sparsity",
         "below target_sparsity"),
        ({"magnitude": {"p": {"scope": "global", "min_sparsity": 0.6}}}, "pruning.magnitude.p.min_sparsity",
         "above target_sparsity"),
        ({"magnitude": {"p": {"scope": "global", "min_sparsity": 1.5}}}, "pruning.magnitude.p.min_sparsity",
         "in [0, 1]"),
        ({"magnitude": {"p": {"max_sparsty": 0.9}}}, "pruning.magnitude.p.max_sparsty",
         "did you mean 'max_sparsity'"),
        ({"magnitude": {"p": {}}, "scope": "all"}, "pruning.scope", "expected one of: local, global"),
    ],
)
def test_config_errors_name_key_and_leave_model_untouched(section, path, text):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        fxprune.prepare(model, {"pruning": section})
    assert str(e.value).startswith(path + ":") and text in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_yaml_nm_pattern_roundtrip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pruning:\n  magnitude:\n    p: {pattern: '1:4'}\n")
    cfg = fxprune.load_config(f)
    assert cfg.pruners[0].target_sparsity == 0.75
    assert fxprune.load_config(cfg.to_dict()).pruners[0] == cfg.pruners[0]
    f.write_text("pruning:\n  magnitude:\n    p: {pattern: 2:4}\n")
    with pytest.raises(ConfigError, match=rf"{f}: pruning.magnitude.p.pattern: .*quote it"):
        fxprune.load_config(f)
