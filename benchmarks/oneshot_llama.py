"""Time and memory of fxprune.oneshot on a random bf16 Llama, one method per subprocess.

    PYTHONPATH=. python benchmarks/oneshot_llama.py --hidden 1024 --layers 4 --seqs 8 --tokens 128

Prints per method: wall and CPU seconds, the peak RSS above the RSS with the
model resident (sampled every 10 ms), that extra as a fraction of the model's
bytes, and the wall time as a multiple of one dense forward of the same
calibration data measured in the same process (the baseline).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

METHODS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def child(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxprune

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (1, args.tokens), generator=g) for _ in range(args.seqs)]
    with torch.no_grad():
        t = time.perf_counter()
        for b in batches:
            model(b, use_cache=False)
        dense = time.perf_counter() - t
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t, c = time.perf_counter(), time.process_time()
    config = {"pruning": {args.method: {"p": {"weights": ["model.layers.*"]}}, "pattern": args.pattern,
                          "target_sparsity": 0.5}}
    report = fxprune.oneshot(model, config, batches)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    stop.set()
    th.join()
    errs = [w.error for w in report.weights if w.error is not None]
    print(json.dumps({"method": f"{args.method} {args.pattern}", "wall_s": wall, "cpu_s": cpu,
                      "extra_gib": (peak[0] - base) / 2**30, "extra_x_model": (peak[0] - base) / model_bytes,
                      "model_gib": model_bytes / 2**30, "dense_forward_s": dense, "x_dense_forward": wall / dense,
                      "sparsity": report.total_sparsity, "mean_rel_error": sum(errs) / max(len(errs), 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--method", default=None)
    ap.add_argument("--pattern", default="unstructured")
    args, rest = ap.parse_known_args()
    if args.method:
        child(args)
        return
    for method, pattern in METHODS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method, "--pattern", pattern]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        print(line[-1] if line else out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
