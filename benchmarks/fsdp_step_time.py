"""What does fxprune cost per training step under FSDP2? fxprune + fully_shard vs plain fully_shard, on CPU.

Two gloo processes on this machine (loopback) train the same model -- an MLP
of residual blocks (``--dim`` wide, ``--blocks`` deep) at a global batch of
``--batch`` -- with ``fully_shard`` on every block and on the root, SGD
(momentum 0.9, weight decay 5e-4), one full step each time: forward, loss,
backward, ``optimizer.step()``. Variants:

- ``fsdp``          the model as is: the reference;
- ``fsdp+fxprune``  ``fxprune.prepare``'d first (every Linear weight at 50%
                    sparsity, pruned at the first step), then sharded the same
                    way, the optimizer attached (``pruner.attach(opt)``): its
                    costs are re-zeroing each unit's shards before the
                    all-gather (a version check when clean), masking the
                    reduced gradients, and the re-zeroing after the step.

Why interleaved repeats and medians (as ``benchmarks/step_time.py``): the
machine is shared. Each repeat times both variants back to back on the same
batch (alternating which goes first); the ratio reported is the median over
repeats of ``fxprune / fsdp`` within a repeat, with its 25th-75th percentile
band. Rank 0 prints; both ranks time (a step ends at the slower rank anyway:
the collectives synchronize them).

Run: ``python benchmarks/fsdp_step_time.py`` (``--dim``, ``--blocks``,
``--repeats``, ``--steps``). On a machine shared with other jobs wall-clock
ratios swing by tens of percent; ``--clock cpu`` times this process's CPU
time instead (each rank's own work, not the time it waits for the other).
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d: int, blocks: int):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(blocks)])
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


CONFIG = {"pruning": {"magnitude": {"all": {}}, "schedule": "oneshot", "start_epoch": 0, "end_epoch": 0,
                      "target_sparsity": 0.5}}


def _build(args, with_fxprune: bool):
    from torch.distributed.fsdp import fully_shard

    import fxprune

    model = Net(args.dim, args.blocks)
    if with_fxprune:
        model = fxprune.prepare(model, CONFIG)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if with_fxprune:
        model.pruner.attach(opt, steps_per_epoch=10**6)
    return model, opt


def _step(model, opt, x, y) -> None:
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _worker(rank: int, port: int, args) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(rank)
        n = args.batch // WORLD
        x, y = torch.randn(n, args.dim, generator=g), torch.randn(n, 10, generator=g)
        variants = {"fsdp": _build(args, False), "fsdp+fxprune": _build(args, True)}
        for model, opt in variants.values():  # warm up: lazy init, first mask update, allocator
            for _ in range(3):
                _step(model, opt, x, y)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        ratios, times = [], {k: [] for k in variants}
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            took = {}
            for name in order:
                model, opt = variants[name]
                dist.barrier()
                t0 = clock()
                for _ in range(args.steps):
                    _step(model, opt, x, y)
                took[name] = (clock() - t0) / args.steps
                times[name].append(took[name])
            ratios.append(took["fsdp+fxprune"] / took["fsdp"])
        if rank == 0:
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                  f"{WORLD} gloo processes x {args.threads} thread(s), {args.clock} clock")
            print(f"model: {args.blocks} residual blocks of width {args.dim} "
                  f"({sum(p.numel() for p in Net(args.dim, args.blocks).parameters()):,} parameters), "
                  f"global batch {args.batch}, {args.repeats} repeats x {args.steps} steps")
            for name, ts in times.items():
                print(f"  {name:13s} median step {statistics.median(ts) * 1e3:8.2f} ms")
            print(f"fsdp+fxprune / fsdp: median {statistics.median(ratios):.3f}x (25-75%: {q[0]:.3f}-{q[2]:.3f})")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
