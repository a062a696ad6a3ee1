"""What does pruning cost per training step? fxprune vs dense vs the alternatives, on CPU.

For each model (an MLP 784-1024-1024-10 at batch 256, a ResNet, a small
Transformer encoder) this times one full training step -- forward, loss,
backward, ``optimizer.step()`` (SGD, momentum 0.9, weight decay 5e-4) -- for:

- ``dense``          the model as is: the reference;
- ``fxprune``        ``fxprune.prepare``'d, mid-schedule at 50% sparsity, with the
                     seed's per-batch hooks in the loop (``on_batch_begin``,
                     ``on_minibatch_end``, ``on_batch_end``) because users call them,
                     and the optimizer attached (``pruner.attach(opt)``): then the
                     re-zeroing after ``optimizer.step()`` is skipped where it
                     provably changes nothing (``fxprune.zero_preserving``);
- ``fxprune hooks``  the same loop without ``attach``: the pruner never sees the
                     optimizer, so it re-zeroes every pruned weight after each step
                     (one more pass over each);
- ``nn.utils.prune`` ``torch.nn.utils.prune.l1_unstructured`` (amount 0.5) on the
                     same weights (it recomputes ``weight_orig * mask`` in a forward
                     pre-hook every forward);
- ``zero in place``  the dense model with 50% masks multiplied into the weights in
                     place after each ``optimizer.step()``: the cheapest possible
                     way to keep pruned weights at zero, the floor to compare with.

Why interleaved repeats and medians: the machine is shared and CPU timings
drift. Each repeat times every variant back to back (in a rotating order) on
the same batch, and the reported ratio is the median over repeats of
``variant / dense`` within the same repeat, so slow phases of the machine
cancel out; the spread (25th-75th percentile of those ratios) says how noisy
the run was.

Targets (issue 2): fxprune <= 1.05x dense and no slower than nn.utils.prune in
the same run. It also times ``fxprune.prepare`` on torchvision's resnet18
(target <= 0.2 s).

Run: ``python benchmarks/step_time.py`` (``--repeats``, ``--threads``, ``--only mlp``).
On a machine shared with other jobs, wall-clock ratios swing by tens of
percent; ``--threads 1 --clock cpu`` (this process's CPU time, one thread)
keeps the 25th-75th percentile band within a few percent.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import fxprune

#: Mid-schedule: goal 0.3 at epoch 0 rising to 0.7 at epoch 4, so the goal at epoch 2 is 0.5.
MID_SCHEDULE = {
    "magnitude": {"prune1": {}},
    "start_epoch": 0,
    "end_epoch": 4,
    "frequency": 1,
    "init_sparsity": 0.3,
    "target_sparsity": 0.7,
}
MID_EPOCH = 2
SPARSITY = 0.5
TARGET_RATIO = 1.05


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    """The ResNet basic block (He et al. 2016): two 3x3 convs with batch norm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet (3 stages of 2 basic blocks, 16/32/64 channels), for when torchvision is missing."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
            blocks.append(BasicBlock(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallTransformer(nn.Module):
    """``nn.TransformerEncoder`` (4 layers, d_model 256, 4 heads, FFN 1024) + a mean-pooled classifier."""

    def __init__(self, d_model: int = 256, layers: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    steps: int  # timed steps per variant per repeat (each timing covers this many steps)


def resnet_case(batch: int = 16, size: int = 64) -> Case:
    """torchvision's resnet18 when importable (the model the issue's anchors use), else SmallResNet.

    The masks cost a fixed amount per weight while compute grows with batch x image size, so
    the ratio falls as they grow: ``--cnn-batch`` / ``--cnn-size`` show it.
    """
    try:
        from torchvision.models import resnet18  # optional extra
    except ImportError:
        return Case("resnet (SmallResNet)", "own CIFAR-style ResNet-14, batch 32x3x32x32 (torchvision missing)",
                    SmallResNet, lambda: (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), 2)
    return Case("resnet18", f"torchvision resnet18 (weights=None, 10 classes), batch {batch}x3x{size}x{size}",
                lambda: resnet18(weights=None, num_classes=10),
                lambda: (torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))), 1)


def all_cases(cnn_batch: int = 16, cnn_size: int = 64) -> list[Case]:
    return [
        Case("mlp", "MLP 784-1024-1024-10, batch 256", MLP,
             lambda: (torch.randn(256, 784), torch.randint(0, 10, (256,))), 3),
        resnet_case(cnn_batch, cnn_size),
        Case("transformer", "nn.TransformerEncoder 4x(d256, 4 heads, ffn 1024), batch 16x64 tokens",
             SmallTransformer, lambda: (torch.randn(16, 64, 256), torch.randint(0, 10, (16,))), 1),
    ]


# --------------------------------------------------------------------------- variants
def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def _masks_like_fxprune(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The prepared model's masks by original parameter name, so every variant prunes the same entries."""
    return {t.name: t.masked.mask.clone() for t in prepared.pruner.targets}


def _rerun_prune_hooks_for_attention(model: nn.Module) -> None:
    """Make ``nn.utils.prune`` correct on ``nn.MultiheadAttention``.

    Its forward reads ``self.out_proj.weight`` directly and never calls
    ``out_proj``, so the pruning pre-hook on ``out_proj`` never recomputes the
    weight: training fails on the second backward (the stale weight's graph
    was freed), and the weight would not follow ``weight_orig`` anyway. The
    fix a user would write: run ``out_proj``'s pruning hooks before every
    attention forward. Same per-step work as on any other pruned layer.
    """
    for mha in model.modules():
        if isinstance(mha, nn.MultiheadAttention):
            proj = mha.out_proj
            methods = [h for h in proj._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]
            if methods:
                mha.register_forward_pre_hook(_OutProjPruneHooks(proj, methods))


class _OutProjPruneHooks:
    """A forward pre-hook of ``nn.MultiheadAttention`` that runs ``out_proj``'s pruning hooks."""

    def __init__(self, proj: nn.Module, methods: list) -> None:
        self.proj, self.methods = proj, methods

    def __call__(self, module: nn.Module, args: tuple) -> None:
        for method in self.methods:
            method(self.proj, args)


def make_variants(case: Case, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, Callable[[], None]], dict]:
    """One ``step()`` closure per variant, each with its own copy of the model and optimizer."""
    torch.manual_seed(0)
    dense = case.build().train()

    prepared = fxprune.prepare(dense, MID_SCHEDULE)
    pruner = prepared.pruner
    pruner.on_epoch_begin(MID_EPOCH)  # goal 0.5: masks installed, as mid-training
    masks = _masks_like_fxprune(prepared)
    report = fxprune.sparsity_report(prepared)

    def loop(model: nn.Module, before=None, after_loss=None, after=None, attach=None) -> Callable[[], None]:
        opt = _optimizer(model)
        if attach is not None:
            attach(opt)

        def step() -> None:
            if before is not None:
                before()
            loss = F.cross_entropy(model(x), y)
            if after_loss is not None:
                loss = after_loss(model, loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after is not None:
                after()

        return step

    variants: dict[str, Callable[[], None]] = {}
    dense_model = copy.deepcopy(dense)
    variants["dense"] = loop(dense_model)
    variants["fxprune"] = loop(prepared, pruner.on_batch_begin, pruner.on_minibatch_end, pruner.on_batch_end,
                               attach=pruner.attach)
    hooks_only = copy.deepcopy(prepared)  # not attached: a copy drops attachments
    hp = hooks_only.pruner
    variants["fxprune hooks"] = loop(hooks_only, hp.on_batch_begin, hp.on_minibatch_end, hp.on_batch_end)

    tp = copy.deepcopy(dense)
    for name in masks:
        owner_name, _, attr = name.rpartition(".")
        torch_prune.l1_unstructured(tp.get_submodule(owner_name) if owner_name else tp, attr, amount=SPARSITY)
    _rerun_prune_hooks_for_attention(tp)
    variants["nn.utils.prune"] = loop(tp)

    zp = copy.deepcopy(dense)
    # Masks in the weights' dtype: multiplying by a bool mask converts it on every call (several times slower).
    zparams = [(zp.get_parameter(n), m.to(zp.get_parameter(n).dtype)) for n, m in masks.items()]
    with torch.no_grad():
        for p, m in zparams:
            p.mul_(m)

    @torch.no_grad()
    def zero_in_place() -> None:
        for p, m in zparams:
            p.mul_(m)

    variants["zero in place"] = loop(zp, after=zero_in_place)

    def verify() -> None:
        """After timing: every variant really kept its pruned entries at 0 (else its time means nothing)."""
        for t in pruner.targets + hp.targets:
            assert torch.all(t.masked.param.detach()[~t.masked.mask] == 0), f"fxprune: {t.name}"
        steps = pruner._optimizers[0].steps
        info["skipped"] = f"{steps.skipped} of {steps.skipped + steps.done}"
        with torch.no_grad():
            tp(x)  # nn.utils.prune recomputes weight = weight_orig * mask in the forward
        for name in masks:
            owner_name, _, attr = name.rpartition(".")
            owner = tp.get_submodule(owner_name) if owner_name else tp
            weight, orig, mask = getattr(owner, attr), getattr(owner, attr + "_orig"), getattr(owner, attr + "_mask")
            assert torch.equal(weight.detach(), orig.detach() * mask), f"nn.utils.prune: stale {name}"
            assert torch.all(weight.detach()[mask == 0] == 0), f"nn.utils.prune: {name}"
        for (name, mask), (p, _) in zip(masks.items(), zparams):
            assert torch.all(p.detach()[~mask] == 0), f"zero in place: {name}"

    info = {"weights": len(masks), "sparsity": report.pruned_sparsity, "verify": verify,
            "routes": sorted(set(pruner.prepare_report.routes.values()))}
    return variants, info


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_case(case: Case, repeats: int, warmup: int, clock: Callable[[], float] = time.perf_counter
              ) -> tuple[dict[str, list[float]], dict]:
    """Per-step seconds of every variant, ``repeats`` times, interleaved in a rotating order."""
    x, y = case.batch()
    variants, info = make_variants(case, x, y)
    names = list(variants)
    for step in variants.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            step = variants[n]
            t0 = clock()
            for _ in range(case.steps):
                step()
            times[n].append((clock() - t0) / case.steps)
    info["verify"]()
    return times, info


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    i = q * (len(s) - 1)
    lo, hi = int(i), min(int(i) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def prepare_time(repeats: int) -> str:
    """Wall time of ``fxprune.prepare`` on torchvision resnet18 (first call, then median of the rest)."""
    try:
        from torchvision.models import resnet18
    except ImportError:
        return "prepare() on resnet18: skipped (torchvision is not installed)"
    model = resnet18(weights=None)
    config = {"magnitude": {"prune1": {}}, "target_sparsity": 0.5}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fxprune.prepare(model, config)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:]) if len(times) > 1 else times[0]
    verdict = "ok" if med <= 0.2 else "MISS"
    return (f"prepare() on torchvision resnet18 (weights=None): first call {times[0]:.3f} s, "
            f"median of {len(times) - 1} more {med:.3f} s  [target <= 0.2 s: {verdict}; issue's anchors 1.1-1.9 s]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved repeats per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", action="append", help="run only these models (mlp, resnet, transformer)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (what a user waits for); cpu: this process's CPU time, "
                             "steadier on a shared machine (use with --threads 1: idle threads spin)")
    parser.add_argument("--cnn-batch", type=int, default=16, help="resnet18 batch size")
    parser.add_argument("--cnn-size", type=int, default=64, help="resnet18 image size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"fxprune {fxprune.__version__} from {os.path.dirname(fxprune.__file__)}")
    print(f"step = forward + cross-entropy + backward + SGD(momentum 0.9, wd 5e-4).step; {args.clock} clock; "
          f"{args.repeats} interleaved "
          f"repeats; ratio = median over repeats of (variant / dense in the same repeat) [25th-75th pct]")
    rows = []
    for case in all_cases(args.cnn_batch, args.cnn_size):
        if args.only and not any(o in case.name for o in args.only):
            continue
        times, info = time_case(case, args.repeats, args.warmup, CLOCKS[args.clock])
        print(f"\n{case.name}: {case.description}; {info['weights']} pruned weights at sparsity "
              f"{info['sparsity']:.3f} (fxprune routes: {', '.join(info['routes'])}); "
              f"checked after timing: pruned entries are 0 in every variant; fxprune skipped "
              f"{info['skipped']} re-zeroings after optimizer.step()")
        print(f"  {'variant':<16} {'median ms/step':>14} {'ratio vs dense':>15} {'[25%-75%]':>16}")
        ratios_of = {}
        for name, ts in times.items():
            ratios = [t / d for t, d in zip(ts, times["dense"])]
            ratios_of[name] = ratios
            r = statistics.median(ratios)
            print(f"  {name:<16} {statistics.median(ts) * 1e3:>14.2f} {r:>15.3f} "
                  f"   [{_quantile(ratios, 0.25):.3f}-{_quantile(ratios, 0.75):.3f}]")
        fx = statistics.median(ratios_of["fxprune"])
        tp = statistics.median(ratios_of["nn.utils.prune"])
        # fxprune vs nn.utils.prune head to head: both timed in the same repeat, so their ratio is paired too.
        vs = [a / b for a, b in zip(times["fxprune"], times["nn.utils.prune"])]
        vs_ci = (_quantile(vs, 0.25), _quantile(vs, 0.75))
        print(f"  fxprune / nn.utils.prune: {statistics.median(vs):.3f}   [{vs_ci[0]:.3f}-{vs_ci[1]:.3f}]")
        rows.append((case.name, fx, statistics.median(ratios_of["fxprune hooks"]), tp,
                     statistics.median(ratios_of["zero in place"]), statistics.median(vs), vs_ci))
    print("\nsummary: ratio to dense (median of paired ratios); targets: fxprune <= 1.05 and fxprune/prune <= 1")
    print(f"  {'model':<22} {'fxprune':>8} {'fxprune hooks':>14} {'nn.utils.prune':>15} {'zero in place':>14} "
          f"{'fxprune/prune':>14}  verdict")
    all_ok = True
    for name, fx, fh, tp, zi, vs, (vs_lo, vs_hi) in rows:
        slower = vs > 1.0
        ok = fx <= TARGET_RATIO and not slower
        all_ok &= ok
        notes = []
        if fx > TARGET_RATIO:
            notes.append("> 1.05")
        if slower:
            notes.append("slower than nn.utils.prune" + (" (within noise: 25th pct <= 1)" if vs_lo <= 1.0 else ""))
        print(f"  {name:<22} {fx:>8.3f} {fh:>14.3f} {tp:>15.3f} {zi:>14.3f} {vs:>14.3f}  "
              f"{'ok' if ok else 'MISS: ' + '; '.join(notes)}")
    print()
    print(prepare_time(6))
    if not all_ok:
        print("some targets missed (see MISS above); on a busy machine rerun with more --repeats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
