"""Benchmark: an exact global magnitude threshold over 25M and 110M weights at 90% sparsity.

Compares ``fxprune.masks.global_unstructured_masks`` (radix selection on
order-preserving integer keys, chunked, no concatenation) with the plain
approach: ``torch.kthvalue`` over ``torch.cat`` of all scores. Layer shapes are
realistic: ResNet-50's convolution and linear weights (25.5M) and BERT-base's
matrices (109M). Scores are ``|w|`` of random normal weights.

Peak extra memory is measured per method in a fresh subprocess, after a
warm-up call on a small input (so that importing and first-touching library
code is charged to neither method): the peak RSS (``VmHWM`` of
``/proc/self/status``, reset through ``/proc/self/clear_refs``) minus the RSS
before the call. fxprune's figure is reported both in total and
beyond the returned masks (one byte per weight, which any method must
produce). Exactness is checked against the kthvalue threshold: the pruned
count is exactly k, every pruned score <= the k-th value <= every kept score.

Run from the repository root (about a minute on two cores)::

    python benchmarks/global_threshold.py            # both sizes
    python benchmarks/global_threshold.py --sizes 25M
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SPARSITY = 0.9


def shapes(size: str) -> list[tuple[int, ...]]:
    """Weight shapes of ResNet-50 (25M) or BERT-base (110M), without building the models' other parts."""
    if size == "25M":
        from torchvision.models import resnet50

        import torch

        with torch.device("meta"):
            model = resnet50()
        return [tuple(p.shape) for p in model.parameters() if p.dim() > 1]
    if size == "110M":
        layer = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
        return [(30522, 768), (512, 768), (2, 768)] + layer * 12 + [(768, 768)]
    raise SystemExit(f"unknown size {size!r}")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(size: str, method: str, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    scores = [torch.randn(s).abs_() for s in shapes(size)]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes(size)]
    numel = sum(s.numel() for s in scores)
    k = int(SPARSITY * numel + 0.5)
    # Warm up on a small input first, so that importing and first-touching library code
    # (which counts in RSS) is not charged to either method.
    small = [torch.rand(1000, 1000), torch.rand(300, 700)]
    if method == "kthvalue":
        torch.kthvalue(torch.cat([s.reshape(-1) for s in small]), 1_000_000)
    else:
        from fxprune.masks import global_unstructured_masks

        global_unstructured_masks(small, [torch.ones_like(s, dtype=torch.bool) for s in small], SPARSITY)
    del small
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    if method == "kthvalue":
        kth = torch.kthvalue(torch.cat([s.reshape(-1) for s in scores]), k).values
        out = {"kth": float(kth)}
    else:
        from fxprune.masks import global_unstructured_masks

        keep = global_unstructured_masks(scores, masks, SPARSITY)
        out = {}
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    out.update(seconds=seconds, peak_extra=peak, numel=numel, k=k)
    if method == "fxprune":
        pruned = sum(int((~m).sum()) for m in keep)
        max_pruned = max(float(s[~m].max()) for s, m in zip(scores, keep) if (~m).any())
        min_kept = min(float(s[m].min()) for s, m in zip(scores, keep) if m.any())
        out.update(pruned=pruned, max_pruned=max_pruned, min_kept=min_kept, mask_bytes=numel)
    return out


def run(size: str, method: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", size, method, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["25M", "110M"])
    p.add_argument("--repeat", type=int, default=2, help="runs per method; the fastest time and smallest peak count")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each measurement")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads)))
        return
    mib = 2**20
    print(f"exact global threshold at {SPARSITY:.0%} sparsity, {args.threads} torch thread(s), best of {args.repeat}")
    print(f"{'weights':>8} {'method':>9} {'seconds':>8} {'peak extra MiB':>15} {'beyond masks':>13}  exact")
    ok = True
    for size in args.sizes:
        res: dict[str, dict] = {}
        for method in ("kthvalue", "fxprune"):
            runs = [run(size, method, args.threads) for _ in range(args.repeat)]
            best = dict(runs[0])
            best["seconds"] = min(r["seconds"] for r in runs)
            best["peak_extra"] = min(r["peak_extra"] for r in runs)
            res[method] = best
        kv, fx = res["kthvalue"], res["fxprune"]
        exact = fx["pruned"] == fx["k"] and fx["max_pruned"] <= kv["kth"] <= fx["min_kept"]
        ok &= exact
        beyond = fx["peak_extra"] - fx["mask_bytes"]
        print(f"{fx['numel'] / 1e6:7.1f}M {'kthvalue':>9} {kv['seconds']:8.3f} {kv['peak_extra'] / mib:15.0f} {'':>13}")
        print(f"{'':>8} {'fxprune':>9} {fx['seconds']:8.3f} {fx['peak_extra'] / mib:15.0f} {beyond / mib:13.0f}  "
              f"{'yes' if exact else 'NO'} (pruned {fx['pruned']} of k={fx['k']})")
        print(f"{'':>8} ratio: {kv['seconds'] / fx['seconds']:.2f}x faster, "
              f"{kv['peak_extra'] / max(beyond, 1):.1f}x less extra memory beyond the masks")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
