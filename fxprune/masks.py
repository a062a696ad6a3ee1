"""Scores + sparsity goal -> keep-mask, per the pruner's scope and pattern.

Masks are monotone: an entry pruned once stays pruned, so a new mask only
adds pruned entries to the old one, and already-pruned entries count toward
the goal. Ties are broken by index (tensor order in the pruner, then flat
index; lowest pruned first), so the same weights always give the same mask.
NaN scores rank as ``+inf`` (kept) and ``-0.0`` equals ``0.0``.

Three selections live here, all reached through :func:`select_masks`:

- ``scope: local`` (:func:`local_unstructured_mask`): every tensor at the goal.
- ``scope: global`` (:func:`global_unstructured_masks`): one threshold over all
  of a pruner's tensors, optionally with per-layer ``min_sparsity`` /
  ``max_sparsity``. Exact without concatenating or sorting the scores: a
  radix selection on order-preserving integer keys of the scores (see
  :func:`global_unstructured_masks`), with memory bounded by a chunk.
- ``pattern: "N:M"`` (:func:`nm_mask`): at most N of every M consecutive
  weights along the input dimension are kept.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

from fxprune.config import PrunerConfig, nm_ratio
from fxprune.errors import ConfigError, PruningError
from fxprune.masked import MaskedParameter
from fxprune.layer_collapse import collapse_findings, emit_high_sparsity, warn_high_sparsity

__all__ = [
    "count_to_prune",
    "select_masks_per_tensor",
    "local_unstructured_mask",
    "kth_smallest",
    "global_unstructured_masks",
    "layer_bounds",
    "parse_nm",
    "nm_mask",
    "check_pattern_shapes",
    "select_masks",
    "selects_per_tensor",
]


def count_to_prune(sparsity: float, numel: int) -> int:
    """Entries to prune for ``sparsity`` of ``numel``: nearest integer, halves rounded up."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def local_unstructured_mask(scores: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scored entries of one tensor until exactly ``sparsity`` of it is pruned.

    If more entries are already pruned than the goal asks (a goal that went
    down, or a loaded mask), the old mask is kept: masks never shrink.
    """
    k = count_to_prune(sparsity, mask.numel())
    keep = mask.reshape(-1)
    already = keep.numel() - int(torch.count_nonzero(keep))
    if k <= already:
        return mask.clone()
    s = scores.detach().reshape(-1)
    # A finite sum means no NaN/inf score (one cheap reduction; an overflowing sum only costs the copy).
    if already or not math.isfinite(float(s.sum())):  # the scores are the policy's: overwrite only a copy
        s = torch.nan_to_num(s, nan=math.inf)
        if already:
            s.masked_fill_(torch.logical_not(keep), -math.inf)
    kth = kth_smallest(s, k)
    prune = s < kth
    need = k - int(torch.count_nonzero(prune))
    if need > 0:
        ties = torch.nonzero(s == kth).reshape(-1)[:need]
        prune[ties] = True
    return prune.logical_not_().reshape(mask.shape)


#: Below this many entries ``torch.kthvalue`` on the whole tensor is as fast as anything.
_KTH_DIRECT = 1 << 20
_KTH_SAMPLE = 1 << 16


def kth_smallest(s: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of the flat tensor ``s`` (no NaN), exactly.

    ``torch.kthvalue`` copies the whole tensor and selects in it, which at
    LLM scale (tens of millions of entries per weight) is most of a mask
    update. Instead a fixed-seed random sample of 65536 entries brackets the
    answer between two sample quantiles, one pass counts the entries below
    the bracket, and only the entries inside it (a few percent) are selected
    from. The result is checked (the k-th entry must fall inside the
    bracket) and computed on the whole tensor otherwise, so it is always
    exact, whatever the sample.
    """
    n = s.numel()
    if n <= _KTH_DIRECT:
        return torch.kthvalue(s, k).values
    m = _KTH_SAMPLE
    generator = torch.Generator(device=s.device).manual_seed(n)
    sample = s[torch.randint(n, (m,), generator=generator, device=s.device)].sort().values
    q = k / n
    margin = 6.0 * math.sqrt(max(q * (1.0 - q), 1.0 / m) / m) + 2.0 / m
    lo_i, hi_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < m else None
    below = 0 if lo is None else int(torch.count_nonzero(s < lo))
    if below < k:
        inside = torch.ones_like(s, dtype=torch.bool) if lo is None else s >= lo
        if hi is not None:
            inside &= s <= hi
        candidates = s[inside]
        if below + candidates.numel() >= k:
            return torch.kthvalue(candidates, k - below).values
    return torch.kthvalue(s, k).values  # the sample's bracket missed: select in the whole tensor


# --------------------------------------------------------------------------- global scope
#
# Why a radix selection: the global threshold is the K-th smallest score over
# all of a pruner's tensors. ``torch.kthvalue`` needs them concatenated (a full
# copy) and then copies again and allocates int64 indices: about 16 bytes per
# weight, 1.7 GiB for 110M weights. Instead each float score is mapped to an
# integer key with the same order (flip the magnitude bits of negative
# floats), and the K-th key is found 16 bits at a time: one pass counts the
# top 16 bits of every key into 65536 buckets (``torch.bincount``), the bucket
# holding the K-th key is found from the cumulative counts, and a second pass
# gathers only the keys inside that bucket (a few hundred thousand for 100M
# Gaussian weights), which are resolved exactly by sorting them. The second
# pass also writes the output masks. Every pass walks the tensors in chunks,
# so the extra memory is a few chunk-sized temporaries plus the candidates.
# If the bucket holds too many keys (many equal scores), the next 16 bits are
# counted the same way, down to a single key whose ties go by index.

_CHUNK = 1 << 18  # elements per chunk: temporaries of ~1-2 MiB, which stay in cache
_GATHER_CAP = 1 << 21  # most candidates gathered at once (~24 MiB of keys and indices)
_DIGIT_BITS = 16
_BUCKETS = 1 << _DIGIT_BITS


class _KeySpace:
    """Integer keys with the order of float scores: float32 -> int32, float64 -> int64."""

    def __init__(self, dtype: torch.dtype):
        if dtype == torch.float64:
            self.fdtype, self.idtype, self.bits = torch.float64, torch.int64, 64
        else:  # float32, and float16/bfloat16 scores widened to float32 (exact)
            self.fdtype, self.idtype, self.bits = torch.float32, torch.int32, 32
        self.pruned = -(1 << (self.bits - 1))  # below every float's key: already-pruned entries
        self.magnitude = (1 << (self.bits - 1)) - 1
        self.sanitize = False
        # Non-negative scores (magnitudes) are their own keys: the float bits as integers.
        # Assumed until the first histogram shows a negative score.
        self.nonneg = True
        # Chunk workspaces, reused by every chunk: allocating fresh temporaries per chunk
        # fragments the heap between the long-lived outputs and inflates the peak RSS.
        self._key = torch.empty(_CHUNK, dtype=self.idtype)
        self._tmp = torch.empty(_CHUNK, dtype=self.idtype)
        self._flag = torch.empty(_CHUNK, dtype=torch.bool)

    def keys(self, scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Keys of one chunk; pruned entries (``keep`` False) get the smallest key of all.

        Negative floats have their magnitude bits flipped; negative keys are
        then shifted up by one so that ``-0.0`` and ``0.0`` share key 0.
        With ``self.sanitize`` NaN is first mapped to ``+inf`` (only needed when
        NaN or +inf scores are present; the first histogram detects them).
        """
        c = scores if scores.dtype == self.fdtype else scores.to(self.fdtype)
        if self.sanitize:
            c = torch.nan_to_num(c, nan=math.inf, posinf=math.inf, neginf=-math.inf)
        b = c.view(self.idtype)
        n = b.numel()
        if self.nonneg:
            if keep is None:
                return b
            k = self._key[:n].copy_(b)
            return k.masked_fill_(torch.logical_not(keep, out=self._flag[:n]), self.pruned)
        sign, k = self._tmp[:n], self._key[:n]
        torch.bitwise_right_shift(b, self.bits - 1, out=sign)  # -1 for negative floats, 0 otherwise
        torch.bitwise_and(sign, self.magnitude, out=k)
        torch.bitwise_xor(b, k, out=k)
        k.sub_(sign)
        if keep is not None:
            pruned = torch.logical_not(keep, out=self._flag[:n])
            k.masked_fill_(pruned, self.pruned)
        return k

    def special_buckets(self) -> tuple[int, int]:
        """Level-0 buckets ``[0, low)`` and ``[high, 65536)``: reached only by pruned entries (bucket 0),
        NaN and +inf scores. Finite scores and -inf land in between."""
        half = 1 << (_DIGIT_BITS - 1)
        inf_top = 0x7F80 if self.bits == 32 else 0x7FF0  # top 16 bits of +inf
        return half - inf_top, half + inf_top

    def digit(self, keys: torch.Tensor, level: int) -> torch.Tensor:
        """The ``level``-th 16-bit digit (0 = most significant), as a bucket index in [0, 65536)."""
        shift = self.bits - _DIGIT_BITS * (level + 1)
        d = torch.bitwise_right_shift(keys, shift, out=self._tmp[: keys.numel()])
        return d.add_(1 << (_DIGIT_BITS - 1)) if level == 0 else d.bitwise_and_(_BUCKETS - 1)

    def prefix(self, keys: torch.Tensor, level: int) -> torch.Tensor:
        """The digits above ``level``, as the signed top bits (comparable with a stored prefix)."""
        return torch.bitwise_right_shift(keys, self.bits - _DIGIT_BITS * level, out=self._tmp[: keys.numel()])


def _chunks(n: int):
    for lo in range(0, n, _CHUNK):
        yield lo, min(n, lo + _CHUNK)


def layer_bounds(
    numels: Sequence[int],
    already: Sequence[int],
    k: int,
    goal: float,
    min_sparsity: float | None,
    max_sparsity: float | None,
) -> tuple[list[int], list[int], int]:
    """Per-layer pruned-count bounds ``(lo, hi)`` and the overall count to reach.

    In force at goal ``g``: each layer prunes at least ``min(min_sparsity, g)``
    of its entries (a floor never above the overall goal, so it holds during
    the ramp too) and at most ``max_sparsity``, rounded inward (ceil / floor).
    Where rounding makes the exact overall count impossible (a bound equal to
    the goal), bounds are relaxed by at most one element per layer. Already
    pruned entries always stay pruned, so they raise both bounds; if that
    forces more than ``k`` entries, the returned count is the smallest
    feasible one and the caller warns.
    """
    n_layers = len(numels)
    lo_frac = 0.0 if min_sparsity is None else min(min_sparsity, goal)
    hi_frac = 1.0 if max_sparsity is None else max_sparsity
    lo = [min(n, math.ceil(lo_frac * n - 1e-9)) for n in numels]
    hi = [max(0, math.floor(hi_frac * n + 1e-9)) for n in numels]
    excess = sum(lo) - k
    for i in range(n_layers):  # relax rounding of the floors: layer order, one element each
        if excess <= 0:
            break
        if lo[i] > math.floor(lo_frac * numels[i]):
            lo[i] -= 1
            excess -= 1
    deficit = k - sum(hi)
    for i in range(n_layers):
        if deficit <= 0:
            break
        if hi[i] < min(numels[i], math.ceil(hi_frac * numels[i])):
            hi[i] += 1
            deficit -= 1
    if deficit > 0:
        raise PruningError(
            f"max_sparsity {max_sparsity} leaves room for only {sum(hi)} pruned entries, "
            f"fewer than the goal's {k}: raise max_sparsity to at least the target sparsity"
        )
    lo = [max(l_, a) for l_, a in zip(lo, already)]
    hi = [max(h, a) for h, a in zip(hi, already)]
    return lo, hi, max(k, sum(lo))


def _clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.minimum(torch.maximum(x, lo), hi)


def global_unstructured_masks(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    sparsity: float,
    *,
    min_sparsity: float | None = None,
    max_sparsity: float | None = None,
    where: str = "global pruner",
) -> list[torch.Tensor]:
    """Keep-masks with one threshold over all tensors: exactly ``sparsity`` of their entries pruned overall.

    The pruned set is the lowest-scored entries in the order (score, tensor
    index, flat index), already-pruned entries first, with each tensor's count
    clamped to its bounds from :func:`layer_bounds`: tensor ``i`` prunes its
    ``clamp(c_i(t), lo_i, hi_i)`` lowest entries, where ``c_i(t)`` counts its
    entries below a global threshold ``t`` chosen so that the counts sum to the
    goal. Without bounds this is plain global magnitude pruning.
    """
    numels = [m.numel() for m in masks]
    already = [m.numel() - int(torch.count_nonzero(m)) for m in masks]
    total = sum(numels)
    k = count_to_prune(sparsity, total)
    if k <= sum(already) or not masks:
        return [m.clone() for m in masks]
    lo, hi, k_feasible = layer_bounds(numels, already, k, sparsity, min_sparsity, max_sparsity)
    if k_feasible > k:
        warnings.warn(
            f"{where}: min_sparsity together with the entries already pruned needs {k_feasible} pruned "
            f"entries, more than the goal's {k} ({sparsity:.4f}); pruning {k_feasible}",
            stacklevel=3,
        )
        k = k_feasible
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32
    return _select(list(scores), list(masks), k, lo, hi, _KeySpace(dtype))


def _select(
    scores: list[torch.Tensor],
    masks: list[torch.Tensor],
    k: int,
    lo: list[int],
    hi: list[int],
    ks: _KeySpace,
) -> list[torch.Tensor]:
    """Radix selection of the ``k`` lowest keys with per-tensor bounds; returns keep-masks.

    Tensors whose bounds can bind ("bound" tensors) keep their own bucket
    counts and get their final mask from a selection of their own once their
    count is known; all other tensors share one histogram and one threshold.
    """
    flat_s = [s.detach().reshape(-1) for s in scores]
    flat_m = [m.reshape(-1) for m in masks]
    numels = [m.numel() for m in flat_m]
    n_t = len(flat_m)
    pruned = [n - int(torch.count_nonzero(m)) for n, m in zip(numels, flat_m)]
    bound = [i for i in range(n_t) if lo[i] > pruned[i] or hi[i] < numels[i]]
    bidx = torch.tensor(bound, dtype=torch.int64)
    lo_b = torch.tensor([lo[i] for i in bound], dtype=torch.int64)
    hi_b = torch.tensor([hi[i] for i in bound], dtype=torch.int64)
    below_b = torch.zeros(len(bound), dtype=torch.int64)  # bound tensors: entries below the range
    below_free = 0  # free tensors together: entries below the range
    prefix: int | None = None  # signed top bits shared by the candidate range (None: all keys)
    level = 0
    while True:
        free = torch.zeros(_BUCKETS, dtype=torch.int64)
        own = torch.zeros(len(bound), _BUCKETS, dtype=torch.int64)
        for i in range(n_t):
            h = own[bound.index(i)] if i in bound else free
            m_i = flat_m[i] if pruned[i] else None
            for a, b in _chunks(numels[i]):
                key = ks.keys(flat_s[i][a:b], None if m_i is None else m_i[a:b])
                if prefix is not None:
                    key = key[ks.prefix(key, level) == prefix]
                h += torch.bincount(ks.digit(key, level), minlength=_BUCKETS)
        if level == 0:
            hist = free + own.sum(0)
            if ks.nonneg and int(hist[: _BUCKETS // 2].sum()) > sum(pruned):
                ks.nonneg = False  # negative scores: count again with sign-aware keys
                continue
            low, high = ks.special_buckets()
            if not ks.sanitize and (int(hist[:low].sum()) > sum(pruned) or int(hist[high:].sum()) > 0):
                ks.sanitize = True  # NaN or +inf scores: count again with NaN read as +inf
                continue
        zero = torch.zeros(1, dtype=torch.int64)
        cum_free = torch.cat([zero, free.cumsum(0)])
        f = cum_free + below_free
        if bound:
            cum_own = torch.cat([zero.expand(len(bound), 1), own.cumsum(1)], 1)
            f = f + _clamp(cum_own + below_b[:, None], lo_b[:, None], hi_b[:, None]).sum(0)
        # The bucket holding the k-th pruned entry: f(d) < k <= f(d + 1).
        d = max(0, int(torch.searchsorted(f, torch.tensor([k]))) - 1)
        below_free += int(cum_free[d])
        if bound:
            below_b = below_b + cum_own[:, d]
        ties_b = own[:, d].clone() if bound else torch.zeros(0, dtype=torch.int64)
        in_range = int(free[d]) + int(ties_b.sum())
        prefix = d - (1 << (_DIGIT_BITS - 1)) if level == 0 else (prefix << _DIGIT_BITS) | d
        level += 1
        if in_range <= _GATHER_CAP or _DIGIT_BITS * level >= ks.bits:
            break
    f_lo = below_free + (int(_clamp(below_b, lo_b, hi_b).sum()) if bound else 0)
    state = _Range(prefix, level, ks)
    if in_range <= _GATHER_CAP:
        keep, counts = _finish_gather(flat_s, flat_m, pruned, state, k - f_lo, bound, below_b, lo_b, hi_b)
    else:  # a single key shared by too many entries: ties go by index
        keep, counts = _finish_ties(flat_s, flat_m, pruned, state, k - f_lo, bound, below_b, lo_b, hi_b, ties_b)
    for j, i in enumerate(bound):
        c = counts[j]
        keep[i] = _select([flat_s[i]], [flat_m[i]], c, [0], [numels[i]], ks)[0] if c else flat_m[i].clone()
    return [kp.reshape(m.shape) for kp, m in zip(keep, masks)]


class _Range:
    """The candidate range: keys whose top ``16 * level`` bits equal ``prefix``."""

    def __init__(self, prefix: int, level: int, ks: _KeySpace):
        self.prefix, self.level, self.ks = prefix, level, ks

    def split(
        self, s: torch.Tensor, m: torch.Tensor | None, keep_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and in-range entries of one chunk; writes ``key >= range`` (kept so far) to ``keep_out``."""
        key = self.ks.keys(s, m)
        top = self.ks.prefix(key, self.level)
        torch.ge(top, self.prefix, out=keep_out)
        return key, torch.eq(top, self.prefix, out=self.ks._flag[: key.numel()])


def _output_masks(flat_m: list[torch.Tensor]) -> list[torch.Tensor]:
    """The output masks as views of one buffer, allocated before the pass.

    One allocation up front, instead of one per tensor between the chunk
    temporaries, keeps the allocator from fragmenting: otherwise the freed
    temporaries sit between live masks and the peak RSS grows by several
    bytes per weight.
    """
    buf = torch.empty(sum(m.numel() for m in flat_m), dtype=torch.bool)
    return list(torch.split(buf, [m.numel() for m in flat_m]))


def _finish_gather(flat_s, flat_m, pruned, rng: _Range, need: int, bound, below_b, lo_b, hi_b):
    """Second pass: prune everything below the range, gather the range, resolve it exactly by sorting."""
    keep = _output_masks(flat_m)
    cand_key, cand_pos, cand_tid = [], [], []
    for i, (s, m) in enumerate(zip(flat_s, flat_m)):
        out = keep[i]
        has_pruned = bool(pruned[i])
        for a, b in _chunks(m.numel()):
            key, inside = rng.split(s[a:b], m[a:b] if has_pruned else None, out[a:b])
            pos = torch.nonzero(inside).reshape(-1)
            if pos.numel():
                cand_key.append(key[pos].to(torch.int64))
                cand_pos.append(pos + a)
                cand_tid.append(torch.full_like(pos, i))
    if not cand_key:
        return keep, [int(x) for x in _clamp(below_b, lo_b, hi_b)] if len(bound) else []
    key = torch.cat(cand_key)
    pos = torch.cat(cand_pos)
    tid = torch.cat(cand_tid)
    order = torch.sort(key, stable=True).indices  # (key, tensor, index): gathered in tensor, index order
    pos, tid = pos[order], tid[order]
    # Rank of each candidate within its tensor, in sorted order.
    by_t = torch.sort(tid, stable=True).indices
    per_t = torch.bincount(tid, minlength=len(flat_m))
    starts = per_t.cumsum(0) - per_t
    rank = torch.empty_like(tid)
    rank[by_t] = torch.arange(tid.numel()) - starts[tid[by_t]]
    gain = torch.ones_like(tid)
    slot = torch.full((len(flat_m),), -1, dtype=torch.int64)
    if len(bound):
        slot[torch.tensor(bound)] = torch.arange(len(bound))
        isb = slot[tid] >= 0
        sb = slot[tid[isb]]
        c = below_b[sb] + rank[isb] + 1
        gain[isb] = ((c > lo_b[sb]) & (c <= hi_b[sb])).to(torch.int64)
    reached = gain.cumsum(0)
    p = 0 if need <= 0 else int(torch.searchsorted(reached, torch.tensor([need]))) + 1
    take = torch.zeros_like(tid, dtype=torch.bool)
    take[:p] = True
    chosen = take & (slot[tid] < 0)
    for i in torch.unique(tid[chosen]).tolist():
        keep[i][pos[chosen & (tid == i)]] = False
    counts = []
    for j, i in enumerate(bound):
        n_i = int(torch.count_nonzero(take & (tid == i)))
        counts.append(int(_clamp(below_b[j] + n_i, lo_b[j], hi_b[j])))
    return keep, counts


def _finish_ties(flat_s, flat_m, pruned, rng: _Range, need: int, bound, below_b, lo_b, hi_b, ties_b):
    """Second pass when the range is one key held by many entries: ties are taken in index order."""
    keep = _output_masks(flat_m)
    counts = []
    for i, (s, m) in enumerate(zip(flat_s, flat_m)):
        out = keep[i]
        if i in bound:
            j = bound.index(i)
            base = int(_clamp(below_b[j], lo_b[j], hi_b[j]))
            top = int(_clamp(below_b[j] + ties_b[j], lo_b[j], hi_b[j]))
            got = min(max(need, 0), top - base)
            need -= got
            counts.append(base + got)
            continue  # its mask is made by the caller
        has_pruned = bool(pruned[i])
        for a, b in _chunks(m.numel()):
            key, inside = rng.split(s[a:b], m[a:b] if has_pruned else None, out[a:b])
            if need > 0:
                first = inside & (inside.cumsum(0) <= need)
                need -= int(torch.count_nonzero(first))
                out[a:b] &= ~first
    return keep, counts


# --------------------------------------------------------------------------- N:M pattern


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` for other patterns (validated in :mod:`fxprune.config`)."""
    return nm_ratio(pattern)


def check_pattern_shapes(targets: list[tuple[str, str, tuple[int, ...]]], config) -> None:
    """Before the model is touched: every weight of an N:M pruner has an input dim divisible by M.

    ``targets`` are ``(name, pruner, shape)``; raises :class:`ConfigError` naming the weight.
    """
    pruners = {p.name: p for p in config.pruners}
    for name, pruner, shape in targets:
        p = pruners[pruner]
        nm = nm_ratio(p.pattern)
        if nm is None:
            continue
        try:
            _groups_view(torch.empty(shape, device="meta"), nm[1], repr(name))
        except PruningError as e:
            raise ConfigError(f"weight {e}", f"{p.key_path}.pattern", config.source) from None


def _groups_view(x: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """``x`` as rows of ``m`` consecutive entries along the input dimension.

    Linear ``[out, in]``: groups run along ``in``. Conv ``[out, in/groups, *k]``:
    groups run along the input channels at each (out, kernel position), the
    layout of sparse tensor cores for implicit-GEMM convolutions (the input
    channel is the reduction dimension). Other shapes: the last dimension.
    """
    if x.dim() < 2:
        raise PruningError(f"{name}: pattern N:M needs a weight with at least 2 dimensions, got shape {tuple(x.shape)}")
    t = x.movedim(1, -1) if x.dim() > 2 else x
    if t.shape[-1] % m:
        dim = "input channels (dim 1)" if x.dim() > 2 else "input features (dim 1)"
        raise PruningError(
            f"{name}: pattern N:M with M={m} needs the {dim} to be divisible by {m}, "
            f"got shape {tuple(x.shape)}; exclude this weight from the pruner or pick another M"
        )
    return t.reshape(-1, m)


def nm_mask(
    scores: torch.Tensor, mask: torch.Tensor, n: int, m: int, sparsity: float, name: str = "weight"
) -> torch.Tensor:
    """Keep-mask with at most ``n`` of every ``m`` consecutive input weights kept.

    At the pattern's own sparsity ``1 - n/m`` (and above) every group prunes
    its ``m - n`` lowest-scored entries. Below it (during a schedule's ramp),
    exactly ``sparsity`` of the tensor is pruned, choosing the lowest-scored
    entries among each group's ``m - n`` lowest, so the pattern is never
    exceeded and the final step completes it. Already-pruned entries stay
    pruned (a group that already has more than ``m - n`` zeros keeps them).
    """
    keep = _groups_view(mask, m, name)
    s = _groups_view(torch.nan_to_num(scores.detach(), nan=math.inf), m, name).clone()
    s[~keep] = -math.inf
    rank = torch.empty_like(s, dtype=torch.int64)
    rank.scatter_(1, torch.sort(s, dim=1, stable=True).indices, torch.arange(m).expand_as(s).contiguous())
    eligible = (rank < m - n) | ~keep
    if sparsity >= 1.0 - n / m - 1e-12:
        new_keep = keep & ~eligible
    else:
        s[~eligible] = math.inf
        new_keep = local_unstructured_mask(s, keep, sparsity) | (~eligible & keep)
        new_keep &= keep
    return _restore(new_keep, mask)


def _restore(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_groups_view`."""
    if like.dim() > 2:
        moved = like.movedim(1, -1)
        return groups.reshape(moved.shape).movedim(-1, 1).contiguous()
    return groups.reshape(like.shape)


# --------------------------------------------------------------------------- dispatch


def selects_per_tensor(pruner: PrunerConfig) -> bool:
    """True when each weight's mask depends on that weight's scores alone (``scope: local``, N:M), so
    :func:`select_masks` may be called one weight at a time; global scope and channels see them all."""
    pattern = getattr(pruner, "pattern", "unstructured")
    if pattern == "channel":
        return False
    return parse_nm(pattern) is not None or getattr(pruner, "scope", "local") != "global"


def select_masks(
    pruner: PrunerConfig, group: list[MaskedParameter], scores: list[torch.Tensor], goal: float
) -> list[torch.Tensor]:
    """New masks for one pruner's weights at sparsity ``goal``, per the pruner's scope and pattern.

    The one place where mask patterns are chosen; the Pruner calls nothing else.
    Warns (:class:`fxprune.HighSparsityWarning`) about every tensor this update takes
    above 0.99 sparsity or up to a global pruner's default cap.
    """
    new = _select_masks(pruner, group, scores, goal)
    warn_high_sparsity(pruner, [_name(pruner, mp, i) for i, mp in enumerate(group)], [mp.mask for mp in group], new,
                       _cap(pruner) if getattr(pruner, "max_sparsity", None) is None else None)
    return new


def select_masks_per_tensor(
    pruner: PrunerConfig,
    group: list[MaskedParameter],
    scores_of: Callable[[int], torch.Tensor],
    goal: float,
    apply: Callable[[int, torch.Tensor], None],
) -> None:
    """:func:`select_masks` one weight at a time, for pruners where :func:`selects_per_tensor` holds.

    Each weight is scored (``scores_of(i)``), given its new mask (``apply(i, mask)``)
    and its temporaries freed before the next, so an update needs the scratch
    memory of the largest weight, not of the whole model; the masks are the
    ones :func:`select_masks` gives for the whole group, and it warns once for the
    update, naming every tensor taken above 0.99.
    """
    assert selects_per_tensor(pruner), pruner.key_path
    cap = _cap(pruner) if getattr(pruner, "max_sparsity", None) is None else None
    high: list[str] = []
    capped: list[str] = []
    for i, mp in enumerate(group):
        (new,) = _select_masks(pruner, [mp], [scores_of(i)], goal)
        h, c = collapse_findings([_name(pruner, mp, i)], [mp.mask], [new], cap)
        high += h
        capped += c
        apply(i, new)
    emit_high_sparsity(pruner, high, capped, cap)


def _select_masks(
    pruner: PrunerConfig, group: list[MaskedParameter], scores: list[torch.Tensor], goal: float
) -> list[torch.Tensor]:
    pattern = getattr(pruner, "pattern", "unstructured")
    if pattern == "channel":
        # Structured channel pruning (whole output channels, coupled through the
        # channel-dependency graph) lives in fxprune.structured.
        from fxprune.structured.importance import channel_masks

        return channel_masks(pruner, group, scores, goal)
    nm = parse_nm(pattern)
    if nm is not None:
        names = [_name(pruner, mp, i) for i, mp in enumerate(group)]
        return [nm_mask(s, mp.mask, *nm, goal, name) for mp, s, name in zip(group, scores, names)]
    if getattr(pruner, "scope", "local") == "global":
        return global_unstructured_masks(
            scores,
            [mp.mask for mp in group],
            goal,
            min_sparsity=getattr(pruner, "min_sparsity", None),
            max_sparsity=_cap(pruner),
            where=pruner.key_path,
        )
    return [local_unstructured_mask(s, mp.mask, goal) for mp, s in zip(group, scores)]


def _cap(pruner: PrunerConfig) -> float | None:
    """The per-tensor cap in force (``PrunerConfig.tensor_cap``); 1.0, an explicit "no cap", is no bound."""
    cap = getattr(pruner, "tensor_cap", getattr(pruner, "max_sparsity", None))
    return None if cap is None or cap >= 1.0 else cap


def _name(pruner: PrunerConfig, mp: MaskedParameter, i: int) -> str:
    return getattr(mp, "_fxprune_name", f"{pruner.key_path} weight {i}")
