"""One-shot pruning quality, fxprune vs llm-compressor, on a small Llama trained on real text.

Why: SparseGPT, Wanda and magnitude differ only on a model with real structure,
and fxprune's SparseGPT must match llm-compressor's (same algorithm, same
calibration data: a gap beyond noise is a bug). The model is the byte-level
Llama of ``llm_train.py`` (vocabulary 256, hidden 256, 4 layers); both tools
prune the same dense folder with the same 32 calibration sequences of 256
bytes from the training documents; test loss (nats per byte) is measured in
this process on the same windows of held-out documents for every variant, so
differences are paired and their standard error is printed.

The layer-wise reconstruction error ||WX - ŴX||² / ||WX||² is measured here for
both tools the same way (X: the inputs each Linear sees in the *pruned* model on
the calibration data, W the dense weight) and printed next to fxprune's own report.

    nice -n 10 /work/main/.venv/bin/python benchmarks/llm_train.py          # once (cached)
    PYTHONPATH=$PWD nice -n 10 /work/main/.venv/bin/python benchmarks/llm_quality.py [--fresh] [--only fxprune]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_exchange import CACHE, run_llmc, save_calibration  # noqa: E402
from llm_corpus import load_corpus, sample_windows  # noqa: E402
from llm_train import MODEL_DIR, SEQ_LEN, window_losses  # noqa: E402

CALIBRATION = CACHE / "quality-calibration.safetensors"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")
TOOLS = ("fxprune", "llmc")
WEIGHTS = ["model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight"]


def load_dense():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return model.eval()


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@torch.no_grad()
def reconstruction_errors(dense, pruned, calibration: torch.Tensor) -> dict[str, float]:
    """Per Linear: sum ||(W - Ŵ)X||² / sum ||WX||² over the inputs X it sees in ``pruned``."""
    dense_weights = {n: m.weight for n, m in linears(dense).items()}
    sums = {n: [0.0, 0.0] for n in dense_weights}
    hooks = []
    for name, module in linears(pruned).items():
        def hook(module, inputs, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            w = dense_weights[name].float()
            sums[name][0] += (x @ (w - module.weight.float()).T).pow(2).sum().item()
            sums[name][1] += (x @ w.T).pow(2).sum().item()
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for i in range(0, calibration.shape[0], 8):
            pruned(input_ids=calibration[i : i + 8])
    finally:
        for handle in hooks:
            handle.remove()
    return {n: num / den if den else 0.0 for n, (num, den) in sums.items()}


def fxprune_prune(method: str, pattern: str, calibration: torch.Tensor):
    import fxprune

    model = load_dense()
    config = {"pruning": {method: {"decoders": {"weights": WEIGHTS, "pattern": pattern}}, "target_sparsity": 0.5}}
    batches = [{"input_ids": calibration[i : i + 8]} for i in range(0, calibration.shape[0], 8)]
    report = fxprune.oneshot(model, config, batches)
    own = {}
    for entry in getattr(report, "weights", []):
        name = entry.name.removesuffix(".weight")
        own[name] = entry.error
    return model, {"report_errors": own, "report_seconds": getattr(report, "seconds", None)}


def llmc_prune(method: str, pattern: str):
    from transformers import AutoModelForCausalLM

    out_dir = CACHE / f"quality-llmc-{method}-{pattern.replace(':', '')}"
    result = CACHE / f"quality-llmc-{method}-{pattern.replace(':', '')}.run.json"
    data = run_llmc(["--model", str(MODEL_DIR), "--calibration", str(CALIBRATION), "--method", method,
                     "--pattern", pattern, "--dtype", "float32", "--threads", "1", "--result", str(result),
                     "--save-dense", str(out_dir)], result.with_suffix(".log"))
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    return model, {"worker": data}


def achieved_sparsity(model) -> float:
    mods = linears(model).values()
    return sum(int((m.weight == 0).sum()) for m in mods) / sum(m.weight.numel() for m in mods)


def measure(tool: str, method: str, pattern: str, calibration, test, dense, fresh: bool) -> dict:
    path = CACHE / f"quality-{tool}-{method}-{pattern.replace(':', '')}.json"
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    print(f"pruning: {tool} {method} {pattern}", flush=True)
    if tool == "fxprune":
        model, extra = fxprune_prune(method, pattern, calibration)
    else:
        model, extra = llmc_prune(method, pattern)
    data = {"tool": tool, "method": method, "pattern": pattern, "sparsity": achieved_sparsity(model),
            "window_losses": window_losses(model, test).tolist(),
            "errors": reconstruction_errors(dense, model, calibration), **extra}
    data["loss"] = sum(data["window_losses"]) / len(data["window_losses"])
    path.write_text(json.dumps(data, indent=1))
    return data


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    diff = torch.tensor(a) - torch.tensor(b)
    return diff.mean().item(), (diff.std() / diff.numel() ** 0.5).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="redo every pruning run")
    parser.add_argument("--only", choices=TOOLS)
    parser.add_argument("--windows", type=int, default=256, help="test windows of 256 bytes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (MODEL_DIR / "config.json").exists():
        sys.exit(f"{MODEL_DIR} missing: train it first with benchmarks/llm_train.py")
    corpus = load_corpus()
    calibration = sample_windows(corpus.train, 32, SEQ_LEN, torch.Generator().manual_seed(4))
    test = sample_windows(corpus.test, args.windows, SEQ_LEN, torch.Generator().manual_seed(5))
    save_calibration(calibration, CALIBRATION)
    dense = load_dense()
    dense_losses = window_losses(dense, test).tolist()
    dense_loss = sum(dense_losses) / len(dense_losses)
    tools = [args.only] if args.only else list(TOOLS)
    results = {}
    for method in METHODS:
        for pattern in PATTERNS:
            for tool in tools:
                try:
                    results[(tool, method, pattern)] = measure(tool, method, pattern, calibration, test, dense, args.fresh)
                except Exception as error:  # a failed run is reported, the others still run
                    print(f"  {tool} {method} {pattern} FAILED: {type(error).__name__}: {error}"[:2000], flush=True)
    print(f"\ncorpus: {corpus.n_train_docs} train / {corpus.n_test_docs} test documents; "
          f"test {args.windows}x{SEQ_LEN} bytes; dense test loss {dense_loss:.4f} nat/byte")
    print("| method | pattern | fxprune loss | Δ dense | llmc loss | Δ dense | fxprune − llmc (± paired s.e.) | sparsity fx / llmc |")
    print("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        for pattern in PATTERNS:
            fx, lc = results.get(("fxprune", method, pattern)), results.get(("llmc", method, pattern))
            cell = lambda r: (f"{r['loss']:.4f} | {r['loss'] - dense_loss:+.4f}" if r else "— | —")
            gap = "{:+.4f} ± {:.4f}".format(*_paired(fx["window_losses"], lc["window_losses"])) if fx and lc else ""
            sp = " / ".join(f"{r['sparsity']:.3f}" if r else "—" for r in (fx, lc))
            print(f"| {method} | {pattern} | {cell(fx)} | {cell(lc)} | {gap} | {sp} |")
    print()
    checks(results, dense_loss)
    print()
    layer_table(results)


def checks(results: dict, dense_loss: float) -> None:
    def loss(tool, method, pattern):
        r = results.get((tool, method, pattern))
        return r["loss"] if r else None

    def verdict(label: str, ok: bool | None, detail: str) -> None:
        print(f"{'PASS' if ok else ('FAIL' if ok is not None else 'MISSING')}: {label} ({detail})")

    mag = loss("fxprune", "magnitude", "unstructured") or loss("llmc", "magnitude", "unstructured")
    verdict("50% magnitude costs >= 0.1 nat/byte", None if mag is None else mag - dense_loss >= 0.1,
            f"{mag - dense_loss:+.4f}" if mag is not None else "no run")
    for pattern in PATTERNS:
        for method, label in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda")):
            fx, lc = loss("fxprune", method, pattern), loss("llmc", method, pattern)
            ok = None if fx is None or lc is None else fx <= lc + 1e-4
            verdict(f"fxprune {label} <= llm-compressor {label}, {pattern}", ok,
                    f"{fx} vs {lc}" if ok is not None else "missing run")
        for tool in TOOLS:
            sg = loss(tool, "sparsegpt", pattern)
            for other in ("wanda", "magnitude"):
                ot = loss(tool, other, pattern)
                ok = None if sg is None or ot is None else sg < ot
                verdict(f"{tool} SparseGPT < {other}, {pattern}", ok,
                        f"{sg} vs {ot}" if ok is not None else "missing run")


def layer_table(results: dict) -> None:
    """Per-Linear reconstruction error: every method and tool, plus fxprune's own report."""
    columns = [(t, m, p) for m in METHODS for p in PATTERNS for t in TOOLS if (t, m, p) in results]
    if not columns:
        return
    names = list(results[columns[0]]["errors"])
    short = {"unstructured": "50%", "2:4": "2:4"}
    print("layer-wise reconstruction error ||WX-ŴX||²/||WX||² (measured here; [fxprune report] in brackets)")
    print("| layer | " + " | ".join(f"{m} {short[p]} {t}" for t, m, p in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        cells = []
        for key in columns:
            r = results[key]
            cell = f"{r['errors'][name]:.4f}"
            own = (r.get("report_errors") or {}).get(name)
            if own is not None:
                cell += f" [{own:.4f}]"
            cells.append(cell)
        print(f"| {name.removeprefix('model.')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
