"""SparseGPT against a slow, plainly written optimal-brain-surgeon reference (float64, explicit inverses)."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.errors import PruningError
from fxprune.masks import count_to_prune
from fxprune.oneshot.sparsegpt import sparsegpt_prune


def reference_sparsegpt(w, h, sparsity, nm=None, block_size=128, dampening=0.01):
    """Column by column, with the inverse of the not-yet-processed part of H computed from scratch every time.

    Removing w[r, j] with the remaining columns F = {j, j+1, ...} changes that row by
    -w[r, j] / inv(H_FF)[0, 0] * inv(H_FF)[0, :] (optimal brain surgeon). The score of w[r, j]
    is w[r, j]^2 / inv(H_FF)[0, 0]; unstructured masks are chosen per column block (from the
    weights as they are when the block starts), N:M masks per group of M columns when reached.
    """
    w = w.double().clone()
    h = h.double().clone()
    out_f, in_f = w.shape
    dead = torch.diagonal(h) == 0
    for j in range(in_f):
        if dead[j]:
            h[j, j] = 1.0
            w[:, j] = 0.0
    damp = dampening * torch.diagonal(h).mean()
    h = h + damp * torch.eye(in_f, dtype=h.dtype)
    keep = torch.ones(out_f, in_f, dtype=torch.bool)

    def inv_diag(j):
        return torch.linalg.inv(h[j:, j:])[0, 0]

    for j in range(in_f):
        if nm is None and j % block_size == 0:
            j2 = min(j + block_size, in_f)
            scores = torch.stack([w[:, c] ** 2 / inv_diag(c) for c in range(j, j2)], 1)
            k = count_to_prune(sparsity, j2 * out_f) - count_to_prune(sparsity, j * out_f)
            flat = scores.t().reshape(-1)  # the order the implementation breaks ties in (column-major)
            order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))[:k]
            block_keep = torch.ones(flat.numel(), dtype=torch.bool)
            block_keep[order] = False
            keep[:, j:j2] = block_keep.reshape(j2 - j, out_f).t()
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            for r in range(out_f):
                scores = [float(w[r, c] ** 2 / inv_diag(c)) for c in range(j, j + m)]
                lowest = sorted(range(m), key=lambda c: (scores[c], c))[: m - n]
                for c in lowest:
                    keep[r, j + c] = False
        hinv = torch.linalg.inv(h[j:, j:])
        for r in range(out_f):
            if not keep[r, j]:
                w[r, j:] -= w[r, j] / hinv[0, 0] * hinv[0, :]
                w[r, j] = 0.0
    return w, keep


@st.composite
def layers(draw):
    out_f = draw(st.integers(1, 6))
    m = draw(st.sampled_from([2, 4]))
    in_f = m * draw(st.integers(1, 5))
    rows = draw(st.integers(1, 3 * in_f))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g)
    dead = draw(st.lists(st.integers(0, in_f - 1), max_size=2))
    x[:, dead] = 0.0
    w = torch.randn(out_f, in_f, generator=g)
    return w, x, m


@settings(max_examples=40, deadline=None)
@given(layers(), st.sampled_from([0.0, 0.25, 0.5, 0.7]), st.integers(1, 8), st.booleans())
def test_matches_reference(layer, sparsity, block_size, use_nm):
    w, x, m = layer
    h = x.t() @ x
    nm = (m // 2, m) if use_nm else None
    s = 1 - nm[0] / nm[1] if nm else sparsity
    new, keep = sparsegpt_prune(w, h, s, nm=nm, block_size=block_size, dampening=0.01)
    want_w, want_keep = reference_sparsegpt(w, h, s, nm=nm, block_size=block_size, dampening=0.01)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(new.double(), want_w, rtol=1e-3, atol=1e-4 * (1 + want_w.abs().max()))
    assert torch.all(new[~keep] == 0)
    if nm:
        assert torch.all(keep.reshape(w.shape[0], -1, m).sum(-1) <= nm[0])
    else:
        assert int((~keep).sum()) == count_to_prune(s, w.numel())


@settings(max_examples=15, deadline=None)
@given(
    st.integers(16, 40), st.integers(8, 16), st.integers(0, 2**16), st.booleans(), st.integers(4, 128)
)
def test_reconstruction_never_worse_than_magnitude(out_f, groups, seed, use_nm, block_size):
    """On its own calibration inputs SparseGPT's error is below magnitude pruning's.

    Not a theorem: the per-block mask choice and the left-to-right updates are greedy, and on
    tiny layers (a handful of rows and columns) magnitude wins a few percent of the time. On
    layers of realistic shape (here at least 16x32, features on different scales as in language
    models) it has always been clearly better (worst ratio seen ~0.64).
    """
    in_f = 4 * groups
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2 * in_f, in_f, generator=g) * 3 * torch.rand(in_f, generator=g)).double()
    w = torch.randn(out_f, in_f, generator=g).double()
    nm = (2, 4) if use_nm else None
    new, keep = sparsegpt_prune(w, x.t() @ x, 0.5, nm=nm, block_size=block_size)
    from fxprune.masks import local_unstructured_mask, nm_mask

    ones = torch.ones_like(w, dtype=torch.bool)
    mag = nm_mask(w.abs(), ones, 2, 4, 0.5) if nm else local_unstructured_mask(w.abs(), ones, 0.5)
    err = lambda v: float(((x @ (w - v).t()) ** 2).sum())  # noqa: E731
    assert err(new) < err(w * mag)


def test_bf16_solved_in_fp32_and_written_back():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(64, 16, generator=g)
    new16, keep16 = sparsegpt_prune(w.bfloat16(), x.t() @ x, 0.5, nm=(2, 4))
    assert new16.dtype == torch.bfloat16 and keep16.dtype == torch.bool
    new32, keep32 = sparsegpt_prune(w.bfloat16().float(), x.t() @ x, 0.5, nm=(2, 4))
    assert torch.equal(keep16, keep32) and torch.equal(new16, new32.bfloat16())


def test_inputs_untouched_and_errors():
    w = torch.randn(4, 6)
    h = torch.eye(6)
    w0, h0 = w.clone(), h.clone()
    sparsegpt_prune(w, h, 0.5)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    try:
        sparsegpt_prune(w, h, 0.5, nm=(2, 4), name="fc.weight")
    except PruningError as e:
        assert "fc.weight" in str(e) and "4" in str(e)
    else:
        raise AssertionError("6 inputs with 2:4 must fail")
    assert not math.isnan(sparsegpt_prune(w, torch.zeros(6, 6), 0.5).damped_loss)
