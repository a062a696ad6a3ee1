"""Checkpoint sizes and load times of pruned models, against the dense baselines, in one run.

For resnet50 at 70% unstructured (fp32) and a random Llama of about 100M
parameters in bf16 at 50% unstructured and at 2:4:

* ``fxprune.save_sparse`` vs ``torch.save(state_dict)``: size ratio, the bound
  ``nnz * itemsize + numel / 8 + header`` it should be within 3% of, and
  ``load_sparse_state_dict`` time / ``torch.load`` time;
* for the Llama also ``fxprune.save_pretrained`` (compressed-tensors format) vs
  the dense ``model.save_pretrained``: size ratio and ``fxprune.load_pretrained``
  time / ``from_pretrained`` time of the dense folder.

Run: ``PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/checkpoint_size.py [--quick]``
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile
import time

import torch
from torch import nn

import fxprune


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def header_bytes(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    t_dense = timed(lambda: torch.load(dense_path, weights_only=True), repeats)
    t_sparse = timed(lambda: fxprune.load_sparse_state_dict(sparse_path), repeats)
    size, dense = os.path.getsize(sparse_path), os.path.getsize(dense_path)
    limit = bound(model.state_dict()) + header_bytes(sparse_path)
    print(
        f"{label:28s} save_sparse {size / 1e6:8.2f} MB  torch.save {dense / 1e6:8.2f} MB  ratio {size / dense:.3f}  "
        f"vs bound {size / limit:.3f}  load {t_sparse * 1e3:7.1f} ms / torch.load {t_dense * 1e3:7.1f} ms "
        f"= {t_sparse / t_dense:.2f}x"
    )


def compare_hf(label: str, model, tmp: str, repeats: int) -> None:
    import transformers

    dense_dir, sparse_dir = os.path.join(tmp, f"{label}-dense"), os.path.join(tmp, f"{label}-sparse")
    model.save_pretrained(dense_dir)
    saved = fxprune.save_pretrained(model, sparse_dir)
    t_dense = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(dense_dir), repeats)
    t_sparse = timed(lambda: fxprune.load_pretrained(sparse_dir), repeats)
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
        vocab_size=8000, hidden_size=384 if quick else 768, intermediate_size=1024 if quick else 2048,
        num_hidden_layers=4 if quick else 12, num_attention_heads=12, num_key_value_heads=12,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, [p for n, p in model.named_parameters() if "proj" in n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller Llama, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        import torchvision

        resnet = torchvision.models.resnet50().eval()
        prune_unstructured([m.weight for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], 0.7)
        compare_single_file("resnet50 fp32 70%", resnet, tmp, repeats)
        del resnet
        for pattern in ("50%", "2:4"):
            model, weights = llama(args.quick)
            n = sum(p.numel() for p in model.parameters())
            prune_unstructured(weights, 0.5) if pattern == "50%" else prune_24(weights)
            label = f"llama {n / 1e6:.0f}M bf16 {pattern}"
            compare_single_file(label, model, tmp, repeats)
            compare_hf(label, model, tmp, repeats)
            del model, weights


if __name__ == "__main__":
    main()
