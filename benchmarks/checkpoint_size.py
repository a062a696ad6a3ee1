"""Checkpoint sizes and load times of pruned models, against the dense baselines, in one run.

Cases: torchvision resnet50 (random init) at 70% and 90% unstructured (fp32), and
a random Llama (hidden 1024, 8 layers, bf16) at 50% unstructured and at 2:4.

* ``fxprune.save_sparse`` vs ``torch.save(state_dict)``: size ratio, and the file
  against the bound ``nnz * itemsize + numel / 8 + header`` it should be within 3% of;
* load time: ``fxprune.load_sparse(path, model)`` (filling a model in place) and
  ``fxprune.load_sparse_state_dict(path)`` against ``torch.load`` of the dense file,
  ``mmap=False`` (the target: <= 1x) and, as extra information, ``mmap=True``
  (which maps the file and copies nothing, so it is not a like-for-like load).
  Every file is read once before timing (warm page cache); the loaders run in
  interleaved rounds (rotating order, so a burst of load elsewhere on a shared
  machine hits all of them), medians;
* for the Llama also ``fxprune.save_pretrained`` (compressed-tensors format) vs
  the dense ``model.save_pretrained`` (``--hf``).

``--recycled-memory`` keeps freed memory in the process, so that ``torch.load``
copies into pages it used before (its fastest case: a plain copy) instead of
faulting in fresh ones, as a first load in a new process must.

Run: ``PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/checkpoint_size.py [--quick] [--hf] [--repeats N] [--threads N] [--recycled-memory]``
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import struct
import tempfile
import time
from typing import Callable

import torch
from torch import nn

import fxprune


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory (no trimming, no per-allocation mmap up to its 32 MiB limit)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 32 << 20)):
        raise SystemExit("--recycled-memory: mallopt refused (not glibc?)")


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def header_bytes(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn over ``repeats`` rounds, the order rotating each round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            start = time.perf_counter()
            fns[key]()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def warm(path: str) -> None:
    """Read a file (or a folder's files) once, so every timing below reads from the page cache."""
    for p in [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


@torch.no_grad()
def prune_unstructured(weights, sparsity: float) -> None:
    for w in weights:
        k = max(1, int(w.numel() * sparsity))
        threshold = w.abs().flatten().float().kthvalue(k).values
        w.mul_(w.abs() > threshold)


@torch.no_grad()
def prune_24(weights) -> None:
    for w in weights:
        g = w.view(-1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.abs().topk(2, dim=1).indices, True)
        g.masked_fill_(~keep, 0)


def bound(state: dict[str, torch.Tensor]) -> float:
    """nnz * itemsize + numel / 8 for tensors worth compressing, numel * itemsize for the rest."""
    total = 0.0
    seen = set()
    for t in state.values():
        if t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        dense = t.numel() * t.element_size()
        if t.is_floating_point() and t.dim() >= 2:
            total += min(dense, int((t != 0).sum()) * t.element_size() + t.numel() / 8)
        else:
            total += dense
    return total


def compare_single_file(label: str, model: nn.Module, tmp: str, repeats: int) -> None:
    dense_path, sparse_path = os.path.join(tmp, f"{label}.pt"), os.path.join(tmp, f"{label}.safetensors")
    torch.save(model.state_dict(), dense_path)
    fxprune.save_sparse(model, sparse_path)
    target = copy.deepcopy(model)  # load_sparse fills this one; check the result is the saved model
    with torch.no_grad():
        for t in target.state_dict().values():
            t.zero_() if t.is_floating_point() else None
    warm(dense_path), warm(sparse_path)
    t = interleaved({
        "torch.load": lambda: torch.load(dense_path, weights_only=True),
        "torch.load mmap": lambda: torch.load(dense_path, weights_only=True, mmap=True),
        "load_sparse": lambda: fxprune.load_sparse(sparse_path, target),
        "load_sparse_state_dict": lambda: fxprune.load_sparse_state_dict(sparse_path),
    }, repeats)
    same = all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
    size, dense = os.path.getsize(sparse_path), os.path.getsize(dense_path)
    limit = bound(model.state_dict()) + header_bytes(sparse_path)
    print(
        f"{label:24s} save_sparse {size / 1e6:7.2f} MB  torch.save {dense / 1e6:7.2f} MB  ratio {size / dense:.3f}  "
        f"vs bound {size / limit:.3f} | load_sparse {t['load_sparse'] * 1e3:6.1f} ms = "
        f"{t['load_sparse'] / t['torch.load']:.2f}x torch.load ({t['torch.load'] * 1e3:.1f} ms), "
        f"{t['load_sparse'] / t['torch.load mmap']:.1f}x mmap=True ({t['torch.load mmap'] * 1e3:.1f} ms); "
        f"load_sparse_state_dict {t['load_sparse_state_dict'] / t['torch.load']:.2f}x torch.load"
        f"{'' if same else '  MISMATCH: loaded weights differ'}",
        flush=True,
    )


def compare_hf(label: str, model, tmp: str, repeats: int) -> None:
    import transformers

    dense_dir, sparse_dir = os.path.join(tmp, f"{label}-dense"), os.path.join(tmp, f"{label}-sparse")
    model.save_pretrained(dense_dir)
    saved = fxprune.save_pretrained(model, sparse_dir)
    warm(dense_dir), warm(sparse_dir)
    t = interleaved({"dense": lambda: transformers.AutoModelForCausalLM.from_pretrained(dense_dir),
                     "sparse": lambda: fxprune.load_pretrained(sparse_dir)}, repeats)
    t_dense, t_sparse = t["dense"], t["sparse"]
    size, dense = folder_bytes(sparse_dir), folder_bytes(dense_dir)
    print(
        f"{label:28s} save_pretrained [{saved.format}] {size / 1e6:8.2f} MB  dense save_pretrained {dense / 1e6:8.2f} MB  "
        f"ratio {size / dense:.3f}  load_pretrained {t_sparse * 1e3:7.1f} ms / from_pretrained {t_dense * 1e3:7.1f} ms "
        f"= {t_sparse / t_dense:.2f}x"
    )


def llama(quick: bool):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=8000, hidden_size=512 if quick else 1024, intermediate_size=1408 if quick else 2816,
        num_hidden_layers=4 if quick else 8, num_attention_heads=8 if quick else 16,
        num_key_value_heads=8 if quick else 16,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, [p for n, p in model.named_parameters() if "proj" in n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller Llama, fewer repeats")
    parser.add_argument("--hf", action="store_true", help="also the Hugging Face folder formats (slow)")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 9, --quick 3)")
    parser.add_argument("--cases", default="resnet50-70,resnet50-90,llama-50,llama-24")
    parser.add_argument("--recycled-memory", action="store_true", help="keep freed memory in the process (glibc "
                        "mallopt), so torch.load copies into recycled pages instead of faulting in fresh ones: its "
                        "fastest case, the strictest baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (load_sparse decodes "
                        "tensors on that many threads; torch.load reads on one)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    if args.recycled_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{'recycled memory, ' if args.recycled_memory else ''}"
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in (70, 90):
            if f"resnet50-{sparsity}" not in cases:
                continue
            import torchvision

            resnet = torchvision.models.resnet50().eval()
            prune_unstructured([m.weight for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                               sparsity / 100)
            compare_single_file(f"resnet50 fp32 {sparsity}%", resnet, tmp, repeats)
            del resnet
        for pattern in ("50", "24"):
            if f"llama-{pattern}" not in cases:
                continue
            model, weights = llama(args.quick)
            n = sum(p.numel() for p in model.parameters())
            prune_unstructured(weights, 0.5) if pattern == "50" else prune_24(weights)
            label = f"llama {n / 1e6:.0f}M bf16 {'50%' if pattern == '50' else '2:4'}"
            compare_single_file(label, model, tmp, repeats)
            if args.hf:
                compare_hf(label, model, tmp, max(3, repeats // 3))
            del model, weights
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
