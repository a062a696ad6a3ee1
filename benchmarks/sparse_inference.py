"""End-to-end CPU latency of pruned models with sparse kernels (``sparsify_kernels``) vs the same model dense.

Cases, each measured in one run against its own dense baseline:
  * mlp90  -- 12 MLP blocks of BERT-base's shape (768 -> 3072 -> 768, GELU, residual), 90% unstructured
              (fxprune magnitude, local), batch 1 and 16, 1 and 2 threads. Target: <= 0.5x dense.
  * mlp50  -- the same at 50%: nothing may be swapped and nothing may get slower.
  * resnet50 -- torchvision resnet50 (random init), 90% global magnitude, batch 1, 224x224.

Timings interleave dense and sparse round by round (medians, and the spread of the dense samples as the
noise figure), because the machine may be shared. On a machine whose cores are busy with other work, run
with ``OMP_WAIT_POLICY=PASSIVE``: by default OpenMP threads spin while they wait, and a spinning thread
takes the core the working one needs, which makes 2-thread timings measure the scheduler (README).

    nice -n 10 python benchmarks/sparse_inference.py [--cases mlp90,mlp50,resnet50] [--rounds 15]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch
from torch import nn

import fxprune

warnings.filterwarnings("ignore", category=UserWarning)


class MLPStack(nn.Module):
    def __init__(self, blocks: int = 12, d: int = 768, hidden: int = 3072):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                    for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def prune(model: nn.Module, sparsity: float, scope: str = "local") -> nn.Module:
    cfg = {"pruning": {"magnitude": {"p": {"target_sparsity": sparsity, "scope": scope}},
                       "start_epoch": 0, "end_epoch": 0}}
    prepared = fxprune.prepare(model, cfg)
    prepared.pruner.on_epoch_begin(0)
    return fxprune.convert(prepared, inplace=True).eval()


@torch.no_grad()
def interleaved(fns: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return samples


def spread(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=10)
    return (q[-1] - q[0]) / statistics.median(xs)


def case(name: str, dense: nn.Module, x: torch.Tensor, threads: int, rounds: int, kernel_repeats: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    sparse = fxprune.sparsify_kernels(copy.deepcopy(dense), x, repeats=kernel_repeats)
    choose_s = time.perf_counter() - t0
    swapped = sum(isinstance(m, (fxprune.SparseLinear, fxprune.SparseConv2d)) for m in sparse.modules())
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in dense.modules())
    with torch.no_grad():
        err = float((sparse(x) - dense(x)).abs().max())
    s = interleaved({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, rounds)
    d, sp = statistics.median(s["dense"]), statistics.median(s["sparse"])
    row = dict(case=name, threads=threads, batch=x.shape[0], swapped=f"{swapped}/{layers}", dense_ms=d * 1e3,
               sparse_ms=sp * 1e3, ratio=sp / d, min_ratio=min(s["sparse"]) / min(s["dense"]),
               noise=spread(s["dense"]), max_abs_err=err, choose_s=choose_s)
    print(f"{name:9s} threads={threads} batch={x.shape[0]:2d} swapped={row['swapped']:>6s} "
          f"dense={row['dense_ms']:8.2f}ms sparse={row['sparse_ms']:8.2f}ms ratio={row['ratio']:.2f}x "
          f"(fastest {row['min_ratio']:.2f}x) noise(p90-p10)/median={row['noise']:.2f} "
          f"max|diff|={err:.1e} choose={choose_s:.0f}s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="mlp90,mlp50,resnet50")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved end-to-end timing rounds")
    ap.add_argument("--kernel-repeats", type=int, default=9, help="timing rounds per layer in sparsify_kernels")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    cases = args.cases.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available by default, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    for sparsity, name in ((0.9, "mlp90"), (0.5, "mlp50")):
        if name not in cases:
            continue
        dense = prune(MLPStack(), sparsity)
        for t in threads:
            for batch in (1, 16):
                row = case(name, dense, torch.randn(batch, 768), t, args.rounds, args.kernel_repeats)
                if name == "mlp50" and row["swapped"] != f"0/{row['swapped'].split('/')[1]}":
                    print("  FAIL: a layer was swapped at 50%")
    if "resnet50" in cases:
        import torchvision

        dense = prune(torchvision.models.resnet50(), 0.9, scope="global")
        for t in threads:
            case("resnet50", dense, torch.randn(1, 3, 224, 224), t, max(5, args.rounds // 3),
                 max(3, args.kernel_repeats // 3))
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
