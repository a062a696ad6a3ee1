"""How much memory does the training path need at LLM scale? prepare + one 50% update + convert.

For each variant, in a fresh process (so that one variant's freed memory
cannot hide the next one's peak), on a randomly initialised Hugging Face
Llama:

- ``defaults``  ``prepare(model, cfg)`` (a copy of the model), the update,
                ``convert(prepared)`` (another copy): what a user gets without
                asking for anything;
- ``inplace``   ``prepare(model, cfg, inplace=True)``, the update,
                ``convert(prepared, inplace=True)``: the model object itself is
                rewritten and handed back.

The update is ``prepared.pruner.prune_now()`` with a ``schedule: oneshot``
magnitude pruner at 50% over every Linear weight (``scope: local``: each
tensor at 50%), the same mask selection a training run's epoch hook makes.

Memory is the peak resident set size (Linux ``VmHWM``, reset before the
measurement through ``/proc/self/clear_refs``) *above* the resident size with
torch and transformers imported and the model built, printed as a ratio to
the model's parameter bytes; per phase (the peak within that call) and over
the whole pipeline. Times are wall-clock and this process's CPU time.

Run: ``python benchmarks/training_memory.py`` (the 220M-parameter fp32 Llama
of issue 12); ``--preset 1b`` is TinyLlama's shape (1.1B parameters) in
bfloat16, ``--variants inplace`` to run only one variant (the defaults need
about 7x the model at that size).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

PRESETS = {
    # hidden, layers, heads, kv heads, intermediate, vocab, dtype
    "220m": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, vocab_size=32000, dtype="float32"),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000, dtype="bfloat16"),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=256, vocab_size=1000, dtype="float32"),
}
CONFIG = {
    "pruning": {
        "magnitude": {"half": {"weights": ["re:.*(proj|lm_head)\\.weight"]}},
        "schedule": "oneshot",
        "target_sparsity": 0.5,
        "start_epoch": 0,
        "end_epoch": 0,
    }
}


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _child(preset: str, variant: str) -> dict:
    import torch
    import transformers
    import warnings

    import fxprune

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    shape = dict(PRESETS[preset])
    dtype = getattr(torch, shape.pop("dtype"))
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy of a 1B model on the way
    try:
        with torch.no_grad():
            model = transformers.LlamaForCausalLM(config).to(dtype)
    finally:
        torch.set_default_dtype(default)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    phases: dict[str, dict] = {}
    inplace = variant == "inplace"
    held = []  # the user's own model stays referenced when prepare copies it

    def phase(name, fn):
        gc.collect()
        _reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        phases[name] = dict(peak=(_status("VmHWM") - base) / model_bytes, after=(_status("VmRSS") - base) / model_bytes,
                            wall_s=round(wall, 2), cpu_s=round(cpu, 2))
        return out

    prepared = phase("prepare", lambda: fxprune.prepare(model, CONFIG, inplace=inplace) if inplace
                     else fxprune.prepare(model, CONFIG))
    if inplace:
        del model
    else:
        held.append(model)
    phase("update", prepared.pruner.prune_now)
    result = phase("convert", lambda: fxprune.convert(prepared, inplace=inplace))
    sparsity = sum(int((p == 0).sum()) for n, p in result.named_parameters() if n.endswith("proj.weight"))
    total = sum(p.numel() for n, p in result.named_parameters() if n.endswith("proj.weight"))
    overall = max(p["peak"] for p in phases.values())  # each phase's peak includes what earlier ones left
    return dict(preset=preset, variant=variant, params=n_params, model_gib=model_bytes / 2**30, dtype=str(dtype),
                phases=phases, peak=overall, final=phases["convert"]["after"], proj_sparsity=sparsity / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="220m")
    parser.add_argument("--variants", nargs="+", choices=["defaults", "inplace"], default=["inplace", "defaults"])
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}; preset {args.preset}")
    results = []
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--child", args.preset, variant], capture_output=True,
                             text=True, check=False)
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"model: {first['params'] / 1e6:.1f}M parameters, {first['dtype']}, {first['model_gib']:.2f} GiB")
    print("memory is peak RSS above the RSS with the model built, as a multiple of the model's bytes")
    header = f"{'variant':<10}{'phase':<10}{'peak':>8}{'after':>8}{'wall s':>9}{'cpu s':>8}"
    print(header)
    for r in results:
        for name, p in r["phases"].items():
            print(f"{r['variant']:<10}{name:<10}{p['peak']:>7.2f}x{p['after']:>7.2f}x{p['wall_s']:>9.2f}{p['cpu_s']:>8.2f}")
        print(f"{r['variant']:<10}{'whole':<10}{r['peak']:>7.2f}x  (projection sparsity {r['proj_sparsity']:.4f})")


if __name__ == "__main__":
    main()
