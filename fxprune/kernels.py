"""Choose, per layer and by measurement, whether a sparse kernel beats dense; then swap it in.

Sparse matmul pays only at high sparsity and depends on the shape, the batch,
the dtype and the thread count (at 90% a 3072x768 Linear runs in 0.2-0.5x the
dense time, at 50% in 3-20x), so no rule of thumb decides it: each
``nn.Linear`` / ``nn.Conv2d`` is timed on the input it actually receives
during one run of the example, dense against each sparse layout
(:mod:`fxprune.sparse_modules`), in the dtype and ``torch.get_num_threads()``
in force. A layer is swapped only when the best sparse candidate's median
time is below ``margin`` times the dense median (and its output matches);
everything else stays dense, with the reason recorded.

``choose_kernels`` measures and changes nothing; ``sparsify_kernels`` swaps
what it chose. Timings interleave dense and candidates round by round, so a
burst of load from elsewhere on the machine hits both.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fxprune.sparse_modules import SPARSE_DTYPES, SparseConv2d, SparseLinear

__all__ = ["KernelChoice", "choose_kernels", "sparsify_kernels"]

_SWAPPABLE: tuple[type, ...] = (nn.Linear, nn.Conv2d)
_BSR_BLOCKS = (32, 16, 8, 4)


@dataclass
class KernelChoice:
    """What was measured for one layer and what was chosen. Times are median seconds per call."""

    name: str
    kind: str  # 'linear' or 'conv2d'
    weight_shape: tuple[int, ...]
    dtype: str
    sparsity: float
    input_shape: tuple[int, ...] | None = None  # the first call's input and output in the example run
    output_shape: tuple[int, ...] | None = None
    threads: int = 1
    dense_s: float | None = None
    candidates_s: dict[str, float] = field(default_factory=dict)  # layout ('csr', 'bsr16', ...) -> median time
    dense_min_s: float | None = None  # fastest dense sample; (dense_s - dense_min_s) / dense_min_s is the noise
    # How dense and sparse were timed: 'cold' with the weights evicted from the last-level cache (that model's
    # weights exceed it, so a forward pass reads them from memory), else 'warm'.
    cache: str = "dense warm, sparse warm"
    candidates_min_s: dict[str, float] = field(default_factory=dict)
    chosen: str = "dense"
    reason: str = ""

    @property
    def chosen_s(self) -> float | None:
        """Median time of what was chosen (the dense time if dense was kept)."""
        return self.candidates_s.get(self.chosen, self.dense_s)

    @property
    def ratio(self) -> float | None:
        """Chosen time / dense time (1.0 when kept dense, None when not measured)."""
        if self.dense_s is None or self.chosen_s is None:
            return None
        return self.chosen_s / self.dense_s


def _split_example(example: Any) -> tuple[tuple, dict]:
    from fxprune.prepare import split_example as split  # one reading of example_inputs for the whole package

    return split(example)


def _last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs), 32 MiB where it cannot be read."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def _times(fns: dict[str, Callable[[], Any]], repeats: int, min_time_s: float,
           evict: Tensor | None = None, cold: frozenset[str] = frozenset()) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each fn; rounds interleave the fns (rotating order) against load bursts.

    For the fns in ``cold``, every sample is one call after writing ``evict`` (a buffer larger than the
    last-level cache): the weights come from memory, as they do in a forward pass of a model larger than
    the cache. The others repeat calls for ``min_time_s`` on a warm cache.
    """
    number: dict[str, int] = {}
    for key, fn in fns.items():  # warm-up, and calls per timing so one timing lasts >= min_time_s
        fn()
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        number[key] = 1 if key in cold else max(1, min(1000, int(min_time_s / once) + 1))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            fn, n = fns[key], number[key]
            if key in cold:
                evict.add_(1.0)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[key].append((time.perf_counter() - t0) / n)
    return {k: (statistics.median(v), min(v)) for k, v in samples.items()}


def _sparse_bytes(module: nn.Module, min_sparsity: float, force: bool) -> int:
    """Bytes of the layer's weight in a model where every layer that gets timed is CSR (int32 indices)."""
    weight = module.weight.detach()
    dense = weight.numel() * weight.element_size()
    if _ineligible(module) is not None:
        return dense
    nnz = int(torch.count_nonzero(weight))
    if not force and 1 - nnz / max(weight.numel(), 1) < min_sparsity:
        return dense
    return nnz * (weight.element_size() + 4) + (weight.shape[0] + 1) * 4


def _bsr_blocks(weight2d: Tensor, density: float) -> list[int]:
    """Block sizes whose non-zero blocks are few enough for BSR to be worth timing (block-structured zeros)."""
    out = []
    rows, cols = weight2d.shape
    for b in _BSR_BLOCKS:
        if rows % b or cols % b:
            continue
        blocks = (weight2d.reshape(rows // b, b, cols // b, b) != 0).any(3).any(1)
        if blocks.float().mean().item() <= min(0.5, 2 * density):
            out.append(b)
        if len(out) == 2:
            break
    return out


def _make_sparse(module: nn.Module, layout: str) -> nn.Module:
    block = int(layout[3:]) if layout.startswith("bsr") else None
    kind = "bsr" if block else "csr"
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_dense(module, kind, block)
    return SparseLinear.from_dense(module, kind, block)


def _ineligible(module: nn.Module) -> str | None:
    if type(module) not in _SWAPPABLE:
        return f"{type(module).__name__} is a subclass of {type(module).__mro__[1].__name__}; its forward may differ"
    if isinstance(module, nn.Conv2d) and (why := SparseConv2d.unsupported(module)):
        return why
    w = module.weight
    if w.dtype not in SPARSE_DTYPES:
        return f"dtype {str(w.dtype).replace('torch.', '')}: torch's CPU sparse matmul implements float32/float64 only"
    if w.device.type != "cpu":
        return f"on {w.device}: these kernels are CPU kernels"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks, which a replacement module would drop"
    return None


@torch.no_grad()
def _capture_inputs(model: nn.Module, layers: dict[str, nn.Module], example: tuple[tuple, dict]):
    """Each layer's first input, first output shape and call count during one eval-mode run of the example."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if name not in inputs and args and isinstance(args[0], Tensor):
                inputs[name] = args[0].detach().clone()
        return hook

    def output_hook_for(name: str):
        def hook(module, args, output):
            if name not in outputs and isinstance(output, Tensor):
                outputs[name] = tuple(output.shape)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(output_hook_for(n)) for n, m in layers.items()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # no BatchNorm statistics or dropout masks change while capturing
        args, kwargs = example
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return inputs, outputs, calls


@torch.no_grad()
def choose_kernels(
    model: nn.Module,
    example_inputs: Any,
    *,
    margin: float = 0.8,
    min_sparsity: float = 0.7,
    repeats: int = 9,
    min_time_s: float = 2e-3,
    force: bool = False,
    measure: bool = True,
) -> list[KernelChoice]:
    """Measure every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` on its example input; decide dense or sparse.

    ``example_inputs`` is read as in :func:`fxprune.prepare` (a tuple of
    arguments, a dict of keyword arguments, ``(args, kwargs)``, or one
    tensor); it should have the batch shape you will run. A layer goes sparse
    when its best layout's median time is ``<= margin * dense`` and so is its
    fastest sample (medians alone mislead on a shared machine); layers below
    ``min_sparsity`` are not timed (CSR measured 3-20x slower than dense at 50%). With
    ``force=True`` every eligible layer takes CSR whatever the timing (tests,
    experiments); ``measure=False`` records shapes and eligibility only (no
    timing, everything dense). The model is not modified: it runs once in eval mode and
    its training flags are restored.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from fxprune.graph_module import PreparedGraphModule

    if isinstance(model, PreparedGraphModule):
        raise TypeError("this model is still prepared; use fxprune.convert(prepared, kernels='auto', "
                        "example_inputs=...) or convert it first")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _SWAPPABLE)}
    inputs, outputs, calls = _capture_inputs(model, layers, _split_example(example_inputs))
    # A forward pass streams the weights from memory when they do not all fit in the last-level cache;
    # timing one layer over and over would keep its weight cached and flatter dense (memory-bound at batch 1).
    # Each side is timed in the cache state it would run in: the dense model's weights, and the weights of the
    # model with every timed layer sparse (a fifth to a tenth of the bytes at 90%), may fall on either side.
    llc = _last_level_cache_bytes()
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    sparse_bytes = sum(_sparse_bytes(m, min_sparsity, force) for m in layers.values())
    dense_cold, sparse_cold = measure and dense_bytes > llc, measure and sparse_bytes > llc
    evict = torch.zeros(2 * llc // 4, dtype=torch.float32) if dense_cold or sparse_cold else None
    choices = []
    for name, module in layers.items():
        w = module.weight.detach()
        sparsity = float((w == 0).sum()) / max(w.numel(), 1)
        choice = KernelChoice(name, "conv2d" if isinstance(module, nn.Conv2d) else "linear", tuple(w.shape),
                              str(w.dtype).replace("torch.", ""), sparsity, threads=torch.get_num_threads())
        choices.append(choice)
        x = inputs.get(name)
        choice.input_shape = None if x is None else tuple(x.shape)
        choice.output_shape = outputs.get(name)
        why = _ineligible(module) or (None if x is not None else "not called by the example input")
        if why is None and x.dtype != w.dtype:
            why = f"input dtype {x.dtype} differs from the weight's {w.dtype}"
        if why is None and sparsity < min_sparsity and not force:
            why = f"sparsity {sparsity:.1%} < min_sparsity {min_sparsity:.0%}: not timed"
        if why is None and not measure:
            why = "not measured (measure=False)"
        if why is not None:
            choice.reason = why
            continue
        layouts = ["csr"] + [f"bsr{b}" for b in _bsr_blocks(w.reshape(w.shape[0], -1), 1 - sparsity)]
        sparse = {layout: _make_sparse(module, layout).eval() for layout in layouts}
        reference = module(x)
        sparse = {k: m for k, m in sparse.items() if torch.allclose(m(x), reference, rtol=1e-4, atol=1e-5 *
                                                                      max(1.0, float(reference.abs().max())))}
        if not sparse:
            choice.reason = "sparse output differs from dense on the example (not swapped)"
            continue
        fns = {"dense": lambda: module(x), **{k: (lambda m=m: m(x)) for k, m in sparse.items()}}
        cold = frozenset(["dense"] * dense_cold + list(sparse) * sparse_cold)
        measured = _times(fns, repeats, min_time_s, evict, cold)
        choice.cache = f"dense {'cold' if dense_cold else 'warm'}, sparse {'cold' if sparse_cold else 'warm'}"
        choice.dense_s, choice.dense_min_s = measured.pop("dense")
        choice.candidates_s = {k: med for k, (med, _) in measured.items()}
        choice.candidates_min_s = {k: low for k, (_, low) in measured.items()}
        times = choice.candidates_s
        best = min(times, key=times.__getitem__)
        # Both the medians and the fastest samples must show the gain: on a loaded machine either can mislead.
        wins = (times[best] <= margin * choice.dense_s
                and choice.candidates_min_s[best] <= margin * choice.dense_min_s)
        note = f" (called {calls[name]} times; timed on the first call's input)" if calls.get(name, 0) > 1 else ""
        ratio = f"{times[best] / choice.dense_s:.2f}x (fastest samples {choice.candidates_min_s[best] / choice.dense_min_s:.2f}x)"
        if force:
            choice.chosen, choice.reason = ("csr" if "csr" in times else best), "forced" + note
        elif wins:
            choice.chosen = best
            choice.reason = f"{best} {ratio} dense <= margin {margin}" + note
        else:
            choice.reason = f"best sparse ({best}) {ratio} dense, not <= margin {margin}" + note
    return choices


def sparsify_kernels(
    model: nn.Module,
    example_inputs: Any,
    *,
    margin: float = 0.8,
    min_sparsity: float = 0.7,
    repeats: int = 9,
    min_time_s: float = 2e-3,
    force: bool = False,
) -> nn.Module:
    """Swap in place every layer that :func:`choose_kernels` finds faster sparse; return ``model``.

    For a converted or loaded (dense, pruned) model; ``fxprune.convert(prepared,
    kernels='auto', example_inputs=...)`` does the same on the way out of
    convert. Swapped layers are :class:`~fxprune.sparse_modules.SparseLinear`
    / ``SparseConv2d`` (their repr says the layout and the measured ratio);
    ``model.state_dict()`` keeps the original keys with dense weights.
    All measurements happen before the first swap.
    """
    choices = choose_kernels(model, example_inputs, margin=margin, min_sparsity=min_sparsity, repeats=repeats,
                             min_time_s=min_time_s, force=force)
    chosen = {c.name: c for c in choices if c.chosen != "dense"}
    replacements = {}
    for name, c in chosen.items():
        module = model.get_submodule(name)
        new = _make_sparse(module, c.chosen)
        new.measured = (f"{c.ratio:.2f}x dense at input {tuple(c.input_shape)}, {c.threads} thread(s)"
                        if c.ratio is not None else c.reason)
        new.train(module.training)
        replacements[id(module)] = new
    for parent in list(model.modules()):  # every name a swapped module has (shared modules included)
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[attr] = replacements[id(child)]
    return replacements.get(id(model), model)  # a model that is itself one layer is replaced, not edited
