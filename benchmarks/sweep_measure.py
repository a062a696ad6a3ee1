"""Measurements of ``structured_sweep.py``: MACs, latency, Torch-Pruning's baseline, and the resumable row file.

Why a module of its own: the sweep's cases and table say *what* is measured;
this says *how* -- with torch's own FLOP counter, interleaved timing, the
baseline library under a time limit -- so each piece can be read (and tested)
on its own.
"""
from __future__ import annotations

import gc
import json
import math
import signal
import statistics
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["TorchPruningResult", "count_macs", "latency_pair", "n_params", "output_tensor", "read_rows",
           "torch_pruning_run", "write_row"]


def n_params(model: nn.Module) -> int:
    """Parameter count (tied parameters once): what the shrinking removes from the checkpoint."""
    return sum(p.numel() for p in model.parameters())


def output_tensor(y: Any) -> torch.Tensor:
    """The tensor to compare: the output itself, or a HF model's ``last_hidden_state``."""
    if isinstance(y, torch.Tensor):
        return y
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    raise TypeError(f"cannot find the output tensor in a {type(y).__name__}")


def count_macs(model: nn.Module, x: tuple) -> int:
    """Multiply-accumulates of one forward on ``x``, counted by ``torch.utils.flop_counter``.

    Torch's counter sees the aten matmul/convolution/attention ops that run (so
    a pruned model is counted as it really computes, whatever module replaced
    what) and reports 2 FLOPs per multiply-add; MACs are half of that.
    Element-wise ops (norms, activations, adds) are not counted, as in the
    usual MACs tables.
    """
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # torch.nn's fused transformer kernels count no FLOPs
    try:
        with torch.no_grad(), counter:
            model(*x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


def latency_pair(dense: nn.Module, shrunk: nn.Module, x: tuple, repeats: int) -> tuple[float, float]:
    """Median batch-1 forward time of each model, interleaved so machine load hits both alike."""
    times: dict[str, list[float]] = {"dense": [], "shrunk": []}
    with torch.inference_mode():
        dense(*x), shrunk(*x)  # warm-up
        for _ in range(repeats):
            for key, m in (("dense", dense), ("shrunk", shrunk)):
                t0 = time.perf_counter()
                m(*x)
                times[key].append(time.perf_counter() - t0)
    return statistics.median(times["dense"]), statistics.median(times["shrunk"])


# ----------------------------------------------------------------------------- Torch-Pruning, the baseline
class _TimedOut(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _TimedOut


@dataclass
class TorchPruningResult:
    """The baseline's numbers on one model; NaN where unknown."""

    params_ratio: float = math.nan
    macs_ratio: float = math.nan
    note: str = ""  # "" = it pruned and its pruned model runs; else why not
    seconds: float = 0.0  # its pruning time


def torch_pruning_run(build: Callable[[], nn.Module], x: tuple, macs_dense: int, goal: float,
                      timeout: int = 300) -> TorchPruningResult:
    """Torch-Pruning's parameter and MACs ratio on the same model at the same goal (its documented MetaPruner use).

    Magnitude (L1) importance, ``pruning_ratio=goal``, 1000-way classifier
    heads ignored (``nn.Linear`` or SqueezeNet's 1x1 ``nn.Conv2d``), ``num_heads`` given for every ``nn.MultiheadAttention`` and
    the q/k/v layers of attention modules with a head count attribute
    (``prune_num_heads=True``), Hugging Face outputs read through
    ``output_transform``; given up after ``timeout`` seconds (a SIGALRM: some
    graphs keep it busy for hours). The note says whether it failed, timed out
    or its pruned model no longer runs on the example input or returns another
    output shape than the dense model (it pruned the model's output: not
    comparable with fxprune, which keeps the interface); MACs are counted only
    on a model that runs.
    """
    out = TorchPruningResult()
    try:
        import torch_pruning as tp
    except ImportError:
        out.note = "torch_pruning not installed"
        return out
    torch.manual_seed(0)
    model = build()
    before = n_params(model)
    with torch.no_grad():
        dense_shape = output_tensor(model.eval()(*x)).shape
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == 1000)
               or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]
    num_heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
        heads = next((getattr(m, a) for a in ("num_attention_heads", "num_heads")
                      if isinstance(getattr(m, a, None), int)), None)
        for child in ("query", "key", "value", "q_proj", "k_proj", "v_proj"):
            if heads and isinstance(getattr(m, child, None), nn.Linear):
                num_heads[getattr(m, child)] = heads
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, x if len(x) > 1 else x[0],
                                          importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=goal,
                                          ignored_layers=ignored, num_heads=num_heads,
                                          prune_num_heads=bool(num_heads), output_transform=output_tensor)
            pruner.step()
    except _TimedOut:
        out.note = f"timed out after {timeout} s"
        return out
    except Exception as e:  # noqa: BLE001 - a baseline failure is a table cell
        out.note = f"{type(e).__name__}"
        return out
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        out.seconds = time.perf_counter() - t0
    out.params_ratio = n_params(model) / before
    try:
        macs = count_macs(model.eval(), x)  # also the check that its pruned model still runs
        out.macs_ratio = macs / macs_dense if macs_dense else math.nan
        with torch.no_grad():
            shape = output_tensor(model(*x)).shape
        if shape != dense_shape:
            out.note = f"its output shape changes: {tuple(dense_shape)} -> {tuple(shape)}"
    except Exception as e:  # noqa: BLE001
        out.note = f"its model fails: {type(e).__name__}"
    del model, pruner
    gc.collect()
    return out


# ----------------------------------------------------------------------------- the row file (resume)
def write_row(path: Path, row: Any) -> None:
    """Append one finished row (a dataclass; fields that are modules are left out) as one JSON line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {f.name: getattr(row, f.name) for f in fields(row)}  # not asdict: it would deep-copy a model
    data = {k: v for k, v in data.items() if not isinstance(v, nn.Module)}
    with path.open("a") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()


def read_rows(path: Path, cls: type) -> Iterator[Any]:
    """The rows written by :func:`write_row`, as ``cls`` instances (unknown keys dropped, a torn last line skipped)."""
    if not path.exists():
        return
    names = {f.name for f in fields(cls)}
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write
        data = {k: v for k, v in data.items() if k in names}
        if "reasons" in data:  # JSON has no tuples
            data["reasons"] = [tuple(r) for r in data["reasons"]]
        yield cls(**data)
