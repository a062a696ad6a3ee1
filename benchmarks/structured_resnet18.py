"""resnet18 at 50% channels: fxprune (pattern: channel + convert(physical=True)) vs Torch-Pruning vs dense.

Measures, in one run on CPU: parameter count, MACs (counted with forward
hooks on conv/linear layers, the same counter for every model), latency at
batch 1 and 16 (models interleaved in every repeat, median reported), and the
time of the pruning pass itself (fxprune: prepare + mask + convert(physical);
Torch-Pruning: DependencyGraph build + MagnitudePruner with L1 importance +
step). Also checks that the shrunk model's output equals the masked model's.

    python benchmarks/structured_resnet18.py [--repeats 15] [--threads 2]
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


def torch_pruning_pass(model: nn.Module, ratio: float):
    import torch_pruning as tp

    model = copy.deepcopy(model)  # fxprune copies inside prepare; copy outside the timer here too
    t0 = time.perf_counter()
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3, help="pruning passes timed per library (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()

    fx_times, tp_times = [], []
    for _ in range(args.passes):  # interleaved, so that machine load hits both alike
        t, prepared, shrunk = fxprune_pass(dense, args.ratio)
        fx_times.append(t)
        t, tpm = torch_pruning_pass(dense, args.ratio)
        tp_times.append(t)
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
    print(f"pruning pass (median of {args.passes}): fxprune prepare+mask+convert(physical, inplace) "
          f"{statistics.median(fx_times):.3f} s, torch-pruning graph+step {statistics.median(tp_times):.3f} s")
    print(f"max |shrunk - masked| output difference: {diff:.2e}")


if __name__ == "__main__":
    main()
