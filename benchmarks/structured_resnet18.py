"""resnet18 at 50% channels: fxprune (pattern: channel + convert(physical=True)) vs Torch-Pruning vs dense.

Measures, in one run on CPU: parameter count, MACs (counted with forward
hooks on conv/linear layers, the same counter for every model), latency at
batch 1 and 16 (models interleaved in every repeat, median reported), and the
time of the pruning pass itself, interleaved and median of ``--passes``:

* fxprune: ``prepare`` (which deep-copies the model: the user's model is never
  touched) + one mask update + ``convert(physical=True, inplace=True)``. The
  copy cannot be left out of this timer; the copy alone is timed too.
* Torch-Pruning: ``MagnitudePruner`` (dependency graph from an example
  forward, L1 importance) + ``step()``, which prunes the model it is given in
  place. Timed twice, on a fresh copy each time: with ``copy.deepcopy`` inside
  the timer (the same work as fxprune's pass) and with the copy made outside.

Also checks that the shrunk model's output equals the masked model's.

    python benchmarks/structured_resnet18.py [--repeats 15] [--threads 2] [--passes 7]

On a shared or loaded machine use ``--threads 1``: oversubscribed intra-op
threads wait on each other and every latency becomes noise (seen here: 30 ms
dense batch-1 latency with one thread, 950 ms with two on two busy cores).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import fxprune


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of conv and linear layers for one forward of ``x``."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def fxprune_pass(model: nn.Module, ratio: float, inplace: bool = True):
    """One-shot pass; ``inplace=True`` lets convert reuse the prepared model (it is not needed afterwards)."""
    t0 = time.perf_counter()
    cfg = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": ratio, "schedule": "oneshot"}},
           "start_epoch": 0, "end_epoch": 0}
    prepared = fxprune.prepare(model, cfg)
    prepared.pruner.on_epoch_begin(0)
    shrunk = fxprune.convert(prepared, inplace=inplace, physical=True)
    return time.perf_counter() - t0, prepared, shrunk


def torch_pruning_pass(model: nn.Module, ratio: float, copy_in_timer: bool):
    """Torch-Pruning prunes in place: it gets a fresh copy, made inside or outside the timer."""
    import torch_pruning as tp

    if not copy_in_timer:
        model = copy.deepcopy(model)
    t0 = time.perf_counter()
    if copy_in_timer:
        model = copy.deepcopy(model)
    example = torch.randn(1, 3, 224, 224)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[model.fc],
    )
    pruner.step()
    return time.perf_counter() - t0, model


def copy_time(model: nn.Module) -> float:
    t0 = time.perf_counter()
    copy.deepcopy(model)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=7, help="pruning passes timed per library (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()

    times: dict[str, list[float]] = {"fx": [], "tp_copy": [], "tp": [], "copy": []}
    fxprune_pass(dense, args.ratio), torch_pruning_pass(dense, args.ratio, True)  # warm-up (imports, caches)
    for _ in range(args.passes):  # interleaved, so that machine load hits all alike
        t, prepared, shrunk = fxprune_pass(dense, args.ratio)
        times["fx"].append(t)
        t, tpm = torch_pruning_pass(dense, args.ratio, copy_in_timer=True)
        times["tp_copy"].append(t)
        t, tpm = torch_pruning_pass(dense, args.ratio, copy_in_timer=False)
        times["tp"].append(t)
        times["copy"].append(copy_time(dense))
    _, prepared, shrunk = fxprune_pass(dense, args.ratio, inplace=False)  # keep the masked model to compare
    prepared.eval(), shrunk.eval(), tpm.eval()

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (shrunk(x) - prepared(x)).abs().max().item()

    models = {"dense": dense, "fxprune": shrunk, "torch-pruning": tpm}
    n_dense = sum(p.numel() for p in dense.parameters())
    macs_dense = count_macs(dense, torch.randn(1, 3, 224, 224))
    lat: dict[tuple[str, int], list[float]] = {(k, b): [] for k in models for b in (1, 16)}
    inputs = {b: torch.randn(b, 3, 224, 224) for b in (1, 16)}
    with torch.inference_mode():
        for m in models.values():  # warm up
            for b in (1, 16):
                m(inputs[b])
        for _ in range(args.repeats):
            for b in (1, 16):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    m(inputs[b])
                    lat[(k, b)].append(time.perf_counter() - t0)

    print(f"resnet18, {args.ratio:.0%} channels, CPU threads={args.threads}, {args.repeats} interleaved repeats (median)")
    print(f"{'model':14s} {'params':>10s} {'x dense':>8s} {'MACs':>12s} {'x dense':>8s} "
          f"{'b=1 ms':>8s} {'x dense':>8s} {'b=16 ms':>8s} {'x dense':>8s}")
    med = {k: statistics.median(v) for k, v in lat.items()}
    for k, m in models.items():
        n = sum(p.numel() for p in m.parameters())
        macs = count_macs(m, torch.randn(1, 3, 224, 224))
        print(f"{k:14s} {n:10d} {n / n_dense:8.3f} {macs:12d} {macs / macs_dense:8.3f} "
              f"{med[(k, 1)] * 1e3:8.1f} {med[(k, 1)] / med[('dense', 1)]:8.3f} "
              f"{med[(k, 16)] * 1e3:8.1f} {med[(k, 16)] / med[('dense', 16)]:8.3f}")
    med_t = {k: statistics.median(v) for k, v in times.items()}
    print(f"pruning pass, wall seconds, median of {args.passes} interleaved passes:")
    print(f"  fxprune  prepare (incl. its deepcopy) + mask update + convert(physical, inplace)  {med_t['fx']:.3f} s")
    print(f"  torch-pruning  deepcopy + MagnitudePruner(graph, L1) + step                      {med_t['tp_copy']:.3f} s"
          f"   fxprune / torch-pruning = {med_t['fx'] / med_t['tp_copy']:.2f}")
    print(f"  torch-pruning  MagnitudePruner(graph, L1) + step, copy outside the timer        {med_t['tp']:.3f} s")
    print(f"  (the deepcopy of resnet18 alone: {med_t['copy']:.3f} s)")
    print(f"max |shrunk - masked| output difference: {diff:.2e}")


if __name__ == "__main__":
    main()
